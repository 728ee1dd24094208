#!/usr/bin/env bash
# Runs scripts/run_custom_50.py under Nsight Systems: CUDA + nvtx tracing, graph nodes traced one
# by one, child processes (the server) followed. Writes output/run_custom_50.nsys-rep.
# Extra arguments go to run_custom_50.py. Where nsys is missing or writes no report, it says so
# and points to the torch-profiler option, which works everywhere.
set -uo pipefail
case "${1:-}" in
  -h|--help)
    cat <<'USAGE'
usage: bash scripts/profile_nsys.sh [RUN_CUSTOM_50 ARGS ...]

Runs scripts/run_custom_50.py under Nsight Systems (-t cuda,nvtx, --cuda-graph-trace=node,
child processes followed) and writes output/run_custom_50.nsys-rep. Every argument goes to
run_custom_50.py (see: python scripts/run_custom_50.py --help).

environment: NSYS=/path/to/nsys when it is not on PATH or in /opt/nvidia/nsight-systems.
Exit codes: run_custom_50's own; 3 when nsys is missing or wrote no report (it then prints the
torch-profiler command to use instead).
USAGE
    exit 0 ;;
esac
cd "$(dirname "$0")/.."
NSYS=${NSYS:-$(command -v nsys || true)}
if [ -z "$NSYS" ]; then
  NSYS=$(ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys \
             /opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys 2>/dev/null | head -n 1)
fi
fallback() {
  echo "profile_nsys: $1" >&2
  echo "profile_nsys: use the torch profiler instead:" >&2
  echo "  python scripts/run_custom_50.py --torch-profile output/run_custom_50.trace.json" >&2
  echo "  (open the trace in chrome://tracing or https://ui.perfetto.dev)" >&2
  exit 3
}
[ -n "$NSYS" ] && [ -x "$NSYS" ] || fallback "nsys was not found (set NSYS=/path/to/nsys)"
mkdir -p output
rep=output/run_custom_50
rm -f "$rep.nsys-rep" "$rep.qdstrm"
"$NSYS" profile -t cuda,nvtx --cuda-graph-trace=node --trace-fork-before-exec=true \
  --force-overwrite=true -o "$rep" python scripts/run_custom_50.py "$@"
rc=$?
[ $rc -eq 0 ] || echo "profile_nsys: the profiled run exited $rc" >&2
[ -f "$rep.nsys-rep" ] || fallback "nsys ran but wrote no $rep.nsys-rep (a .qdstrm without a report means its importer failed on this machine)"
echo "wrote $rep.nsys-rep: open it in Nsight Systems; the 'graphserver' nvtx domain shows RPCs, prefill, 'capture T=..' on the capture thread and 'replay T=..' on the request thread"
exit $rc
