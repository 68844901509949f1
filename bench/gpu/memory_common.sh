# Sourced by memory.sh, memory_stats.sh and memory_final.sh after common.sh: log(), run() and $STATS (--allocator-stats true when
# allocator_abi.sh finds the layout CudaAllocatorStats reads, else empty). Set LIMIT (seconds) before sourcing.
log() { echo "$*" | tee -a $OUT/memory.log; }
run() {   # run <seconds> <label> <command...>: its JSON lines, labelled, into memory.jsonl, or a line saying why not
  local t=$1 label=$2; shift 2
  if (( SECONDS + 25 > LIMIT )); then log "skipped ($SECONDS s spent): $label"; return; fi
  log "== $label ($SECONDS s)"
  local out; out=$(timeout $t "$@" 2>>$OUT/memory.log); local rc=$?
  local lines; lines=$(echo "$out" | grep '^{')
  if [ $rc -eq 0 ] && [ -n "$lines" ]; then
    echo "$lines" | while read -r line; do echo "{\"label\":\"$label\",${line#\{}"; done | tee -a $OUT/memory.jsonl
  else log "failed (exit $rc$( [ $rc -eq 124 ] && echo ', timed out')): $label"; fi
}
abi=$(bash .gpu/allocator_abi.sh 2>&1); log "allocator ABI: $abi"
STATS=""
case "$abi" in *'"get_device_stats_slot":9,"reset_peak_stats_slot":11,"type":"N3c104cuda20CUDACachingAllocator6Native22NativeCachingAllocatorE","sizeof_stats":976,"sizeof_stat":32,"off_current":0,"off_peak":8,"off_allocated_bytes":384,"off_reserved_bytes":480,"off_active_bytes":576,"off_requested_bytes":768,"off_num_alloc_retries":864'*) STATS="--allocator-stats true" ;;
  *) log "the allocator layout differs from what CudaAllocatorStats reads: no allocator statistics" ;; esac
