# One lane on core 1 (1 thread); everything else on the machine is kept on core 0 by pin_others.sh.
cd /work/cmp && CONFIG=configs/shapes_clip.yaml PY=/work/main/.venv/bin/python bash bench/compare_lanes.sh runs/clip_600s 600 200 "" "flow_grpo:0 dense:0 flow_grpo:1 dense:1 flow_grpo:2 dense:2"
# Flow-GRPO-Fast and DenseGRPO n = 2, seeds 0-2, on the same code (81960e7) in the same one-lane set-up, on a later
# VM of the same kind (its Flow-GRPO-Fast rollouts took 8.3-8.8 s against Flow-GRPO's 7.0-8.7 s on the first VM):
# for ms in flow_grpo_fast:0 dense_n2:0 flow_grpo_fast:1 dense_n2:1 flow_grpo_fast:2 dense_n2:2; do
#   OMP_NUM_THREADS=1 taskset -c 1 python -m densegrpo_fast.cli compare --config configs/shapes_clip.yaml \
#     --budget-s 600 --eval-every-s 200 --out runs/clip_600s --methods ${ms%%:*} --seeds ${ms##*:}; done
# Report:
# python -m densegrpo_fast.experiments.learned_reward --out docs/results/learned_reward_600s \
#   --methods flow_grpo,dense,dense_n2,flow_grpo_fast --seeds 0,1,2 --budget-s 600
