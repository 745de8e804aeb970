# Flow-GRPO to 1200 training seconds on the learned reward: has its curve flattened? Same VM, hours and code
# (08f9391) as ../learned_reward_600s_dense, which reads these runs at 600 s too. One run, on core C:
#   OMP_NUM_THREADS=1 taskset -c C python -m densegrpo_fast.cli compare --config configs/shapes_clip.yaml \
#     --budget-s 1200 --eval-every-s 200 --out runs/clip_1200s --methods flow_grpo --seeds SEED    (SEED = 3, 4, 5)
# Report:
python -m densegrpo_fast.experiments.learned_reward --out docs/results/learned_reward_flow_grpo_1200s \
  --methods flow_grpo --seeds 3,4,5 --budget-s 1200
densegrpo compare --config configs/shapes_clip.yaml --budget-s 1200 --eval-every-s 200 \
  --out docs/results/learned_reward_flow_grpo_1200s --methods flow_grpo --seeds 3,4,5 --report-only --archive
