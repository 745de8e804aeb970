# All runs on one 2-core AMD EPYC VM (AVX2) within 2.5 hours, training code of commit 08f9391 (a worktree), one thread
# per run, each pinned to one core; two lanes took runs from one queue (method:seed:budget, in order), so most runs
# had a run on the other core for their whole life. The order and times are in lanes.log. One run, on core C:
#   OMP_NUM_THREADS=1 taskset -c C python -m densegrpo_fast.cli compare --config configs/shapes_clip.yaml \
#     --budget-s B --eval-every-s 200 --out runs/clip_${B}s --methods METHOD --seeds SEED
# Queue: flow_grpo:0..2:600 dense:0..2:600 dense_n2:0..2:600 flow_grpo_fast:0..2:600, then flow_grpo:3..5:1200
#   (../learned_reward_flow_grpo_1200s; read here at 600 s, their points up to it) and dense_n2:3..4:600.
# Report (after copying each finished run's config.yaml, eval_before_after.json, run_info.json and metrics.jsonl
# here; compare --archive then gathers the metrics into metrics.jsonl.gz):
python -m densegrpo_fast.experiments.learned_reward --out docs/results/learned_reward_600s_dense \
  --methods flow_grpo,dense,dense_n2,flow_grpo_fast --seeds 0,1,2,3,4,5 --budget-s 600
densegrpo compare --config configs/shapes_clip.yaml --budget-s 600 --eval-every-s 200 \
  --out docs/results/learned_reward_600s_dense --methods flow_grpo,dense,dense_n2,flow_grpo_fast --seeds 0,1,2 \
  --report-only --archive
# Learning-rate check (lr_check/, validation split, seed 0, 300 s, before the runs above):
#   densegrpo compare --config configs/shapes_clip.yaml --budget-s 300 --eval-every-s 100 --out runs/pilot/lrLR \
#     --methods flow_grpo --seeds 0 --set eval.split=validation --set train.lr=LR      (LR = 3.0e-3, 1.0e-2)
