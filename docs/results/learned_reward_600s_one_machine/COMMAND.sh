# All runs on one 2-core AMD EPYC VM (AVX2), code of commit 7a83447 (a worktree at /work/cmp), one thread per run,
# each pinned to one core. Two lanes took runs from one queue (bench/compare_lanes.sh does the same with fixed
# lists); core 0 also ran the development work, an evaluation benchmark and a CI check while it had no run.
# One run of the queue, on core C:
#   OMP_NUM_THREADS=1 taskset -c C python -m densegrpo_fast.cli compare --config configs/shapes_clip.yaml \
#     --budget-s 600 --eval-every-s 200 --out runs/clip_600s --methods METHOD --seeds SEED
# Queue (method:seed, in order): tp_grpo:0 flow_grpo:0 tempflow:0 tp_grpo:1 tempflow:1 flow_grpo:1 tp_grpo:2
#   flow_grpo:2 tempflow:2 tempflow_plain:0 tempflow_plain:1 tempflow_plain:2 dense_n1:0 dense_n1:1 dense_n1:2
# Report (reads the archive in this folder; compare.md also holds the speed check and provenance):
python -m densegrpo_fast.experiments.learned_reward --out docs/results/learned_reward_600s_one_machine \
  --methods flow_grpo,tp_grpo,tempflow,tempflow_plain,dense_n1 --seeds 0,1,2 --budget-s 600
densegrpo compare --config configs/shapes_clip.yaml --budget-s 600 --eval-every-s 200 \
  --out docs/results/learned_reward_600s_one_machine --methods flow_grpo,tp_grpo,tempflow,tempflow_plain,dense_n1 \
  --seeds 0,1,2 --report-only
