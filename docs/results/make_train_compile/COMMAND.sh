#!/usr/bin/env bash
# (recorded as run; the three runs are off/, auto1/ and auto2/ here, with their metrics.jsonl gzipped)
# make train three times on core 0, 1 thread, evaluation off: compile off, then auto with a cold cache, then auto warm.
cd /work/main
export DENSEGRPO_COMPILE_CACHE=/work/logs/compile_cache OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
rm -rf /work/logs/compile_cache
for tag in off auto1 auto2; do
  extra=""; [ $tag = off ] && extra="--set model.compile=off"
  rm -rf /work/logs/mt_$tag
  /usr/bin/time -v taskset -c 0 make train RUN_ARGS="--run-dir /work/logs/mt_$tag --set eval.enabled=false $extra" > /work/logs/mt_$tag.log 2>&1
  echo "$(date +%T) $tag rc=$?" >> /work/logs/train_compile.out
done
