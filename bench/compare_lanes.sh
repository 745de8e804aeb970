#!/usr/bin/env bash
# Two `densegrpo compare` lanes side by side on a 2-core CPU: each lane is pinned to one core with one thread, and
# runs its (method, seed) list one run after another into the same comparison folder. Every run of a comparison
# made this way has a neighbour on the other core for its whole life, so their training seconds are measured under
# the same load, provided the two lists hold runs of about the same length (check `compare`'s speed report). A run
# that fails is named on stderr, its lane goes on, and the script exits 1 at the end. Usage:
#   [CONFIG=configs/shapes_clip.yaml] bench/compare_lanes.sh OUT BUDGET_S EVAL_EVERY_S "m:s m:s ..." "m:s m:s ..." \
#     [extra compare args...]                     (CONFIG defaults to configs/shapes_default.yaml)
set -euo pipefail
out=$1; budget=$2; every=$3; lane0=$4; lane1=$5; shift 5
py=${PY:-.venv/bin/python}
config=${CONFIG:-configs/shapes_default.yaml}
lane() {
  local core=$1; shift
  for ms in $1; do
    m=${ms%%:*}; s=${ms##*:}
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c "$core" "$py" -m densegrpo_fast.cli compare \
      --config "$config" --budget-s "$budget" --eval-every-s "$every" --out "$out" \
      --methods "$m" --seeds "$s" "${@:2}" > "$out/lane$core.$m.seed$s.log" 2>&1 \
      || { echo "lane $core: $m seed $s failed (see $out/lane$core.$m.seed$s.log)" >&2; failed=1; }
  done
  return "${failed:-0}"
}
mkdir -p "$out"
lane 0 "$lane0" "$@" & p0=$!
lane 1 "$lane1" "$@" & p1=$!
rc=0; wait "$p0" || rc=1; wait "$p1" || rc=1
exit "$rc"
