# One lane on core 1 (1 thread); everything else on the machine is kept on core 0 by pin_others.sh.
cd /work/cmp && CONFIG=configs/shapes_clip.yaml PY=/work/main/.venv/bin/python bash bench/compare_lanes.sh runs/clip_600s 600 200 "" "flow_grpo:0 dense:0 flow_grpo:1 dense:1 flow_grpo:2 dense:2"
