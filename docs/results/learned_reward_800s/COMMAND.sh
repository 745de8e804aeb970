# All runs on one 2-core AMD EPYC VM (AVX2), the VM of ../learned_reward_600s_dense, training code of commit 08f9391
# (a worktree), one thread per run, each pinned to one core; two lanes took runs from one queue in order (times in
# lanes.log), so most runs had a run on the other core for their whole life.
#
# Extended runs ("ext" in lanes.log): Flow-GRPO, DenseGRPO (n = remaining, n = 2) and Flow-GRPO-Fast, seeds 0-2
# (n = 2: 0-4), are the 600 s runs of ../learned_reward_600s_dense, continued to 800 s from their final checkpoint
# (the state after the epoch that crossed 600 s) by the trainer's resume, with the same evaluation every 200 s:
#   cp -a runs/clip_600s/METHOD/seedSEED runs/clip_800s/METHOD/      # then remove its final LoRA (lora*/...)
#   OMP_NUM_THREADS=1 taskset -c C python -m densegrpo_fast.cli compare --config configs/shapes_clip.yaml \
#     --budget-s 800 --eval-every-s 200 --out runs/clip_800s --methods METHOD --seeds SEED      # adds --resume
# New runs ("new"): TempFlow-GRPO, TP-GRPO, DenseGRPO n = 1, TempFlow-GRPO without its weights, seeds 0-2 (n = 1:
# 0-4; seeds 3 and 4 queued last), from
# scratch, evaluated every 400 s (two evaluations fewer per run, to fit the time; the state scored at 800 s is the
# same whatever the interval):
#   OMP_NUM_THREADS=1 taskset -c C python -m densegrpo_fast.cli compare --config configs/shapes_clip.yaml \
#     --budget-s 800 --eval-every-s 400 --out runs/clip_800s --methods METHOD --seeds SEED
# Flow-GRPO seeds 3-5 are the runs of ../learned_reward_flow_grpo_1200s read at 800 s (their points up to it).
# Report (after copying each finished run's config.yaml, eval_before_after.json, run_info.json and metrics.jsonl
# here; compare --archive then gathers the metrics into metrics.jsonl.gz):
python -m densegrpo_fast.experiments.learned_reward --out docs/results/learned_reward_800s \
  --methods flow_grpo,flow_grpo_fast,dense,dense_n2,dense_n1,tp_grpo,tempflow,tempflow_plain --seeds 0,1,2,3,4,5 \
  --budget-s 800
densegrpo compare --config configs/shapes_clip.yaml --budget-s 800 --eval-every-s 200 \
  --out docs/results/learned_reward_800s \
  --methods flow_grpo,flow_grpo_fast,dense,dense_n2,dense_n1,tp_grpo,tempflow,tempflow_plain --seeds 0,1,2 \
  --report-only --archive
