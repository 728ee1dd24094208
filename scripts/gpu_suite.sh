#!/usr/bin/env bash
# The GPU machine's routine, one phase per argument, logs under $OUT (or output/gpu):
#   build   install the carried wheels, build custom_kernels._C in place, smoke-import it
#   test    pytest -m cuda, both parity scripts (default model bf16 + random GQA hd128),
#           run_custom_50, direct_custom_decode_500
#   bench   scripts/bench_kernels.py and scripts/bench_decode.py ($BENCH_ARGS)
#   retest  after a kernel-test pass: the kernel tests (KERNEL_K=expr selects some), the engine
#           suite, the default-model parity scripts and both runs
# A summary table is printed last. Expects the staged GGUF at $GRAPHSERVER_GGUF, and the wheels
# that scripts/stage_device_wheels.sh puts in .whl/ carried along.
set -uo pipefail
usage() {
  cat <<'USAGE'
usage: bash scripts/gpu_suite.sh PHASE [PHASE ...]

The GPU machine's routine; each phase's log goes to $LOGS (default $TMPDIR/gpu_logs), packed
into $OUT/gpu_logs.tgz (default OUT=output/gpu), then a summary table is printed.

phases:
  build    install the carried wheels (.whl/*.whl), build custom_kernels._C in place, smoke-import it
  test     pytest -m cuda, both parity scripts (default model + random:tiny-hd128),
           run_custom_50, direct_custom_decode_500
  retest   after a kernel-test pass: kernel tests (KERNEL_K=EXPR selects some), engine suite,
           the default-model parity scripts and both runs
  bench    scripts/bench_kernels.py and scripts/bench_decode.py $BENCH_ARGS
  kernels  pytest -m cuda on the kernel tests alone (-n 16)
  batch    pytest -m cuda on the batched engine (tests/test_batching_cuda.py)
  model    what needs the staged default model: the engine suite, both default-model parity
           scripts, run_custom_50
  batchbench  scripts/bench_batch.py $BATCH_ARGS (default: 1B and 7B, B = 1..256)
  changed  the kernel tests of what changes most: the sampler's own file (tests/test_sampling_cuda.py)
           and a -k subset of tests/test_kernels_cuda.py (attention, sampling, PDL, GEMV, norms)
  direct   scripts/direct_custom_decode_500.py, capture started after and before kv_init
  api      pytest -m cuda on the HTTP front end over the GPU engine (tests/test_api_cuda.py:
           a reload under 32 streams on the default model)
  serve    scripts/bench_serve.py on the default model and on random:llama-3.2-1b (HTTP vs engine),
           once per front-end process count in $API_SERVERS (default "1 4")

environment: GRAPHSERVER_GGUF (the staged default-model GGUF), MAX_JOBS (default 16), LOGS, OUT,
BENCH_ARGS, KERNEL_K, API_SERVERS, TOKENIZER (serve's tokenizer for the random model; default: the default model's)
USAGE
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac
for what in "$@"; do
  case $what in
    build|test|retest|bench|kernels|batch|model|batchbench|api|serve|changed|direct) ;;
    *) echo "gpu_suite: unknown phase '$what' (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
# Logs go to one folder, packed into $OUT/gpu_logs.tgz at the end (the device tool returns few files).
LOGS=${LOGS:-${TMPDIR:-/tmp}/gpu_logs}; mkdir -p "$LOGS"
OUT=${OUT:-output/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MAX_JOBS=${MAX_JOBS:-16}
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:${PYTHONPATH:-}; fi
summary=()
phase() {  # name, timeout_s, command...
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  timeout "$t" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-4s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$(grep -E 'passed|failed|error|within tolerance|EQUAL|DIFFER|ms/token|wrote' "$LOGS/$name.log" | tail -n 2 | tr '\n' ' ' | cut -c1-150)")")
  if [ $rc -ne 0 ]; then echo "---- $name failed (rc=$rc), last lines:"; tail -n 25 "$LOGS/$name.log" | cut -c1-300; fi
  return $rc
}
for what in "$@"; do
  case $what in
    build)
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
      fi
      phase build 500 python3 setup.py build_ext --inplace
      phase smoke 120 python3 -c "import torch, custom_kernels.ops as o; print('kernels', o.cuda_kernels_available(), torch.cuda.get_device_name())"
      ;;
    test)
      phase pytest_kernels 420 python3 -m pytest -m cuda -q -x -n 8 tests/test_kernels_cuda.py
      phase pytest_engine 400 python3 -m pytest -m cuda -q -s -rA tests/test_engine_cuda.py
      phase parity1_default 200 python3 scripts/debug_parity_one_step.py --device cuda
      phase parity8_default 200 python3 scripts/debug_parity_seq8.py --device cuda
      phase parity1_hd128 200 python3 scripts/debug_parity_one_step.py --device cuda --model random:tiny-hd128
      phase parity8_hd128 200 python3 scripts/debug_parity_seq8.py --device cuda --model random:tiny-hd128
      phase run_custom_50 300 python3 scripts/run_custom_50.py
      phase direct_500 300 python3 scripts/direct_custom_decode_500.py
      cp output/run_custom_50.* output/direct_custom_decode_500.* "$LOGS/" 2>/dev/null
      ;;
    retest)   # after a kernel-test pass: only what changed, plus everything above the kernels
      phase pytest_kernels 300 python3 -m pytest -m cuda -q -x tests/test_kernels_cuda.py ${KERNEL_K:+-k "$KERNEL_K"}
      phase pytest_engine 400 python3 -m pytest -m cuda -q -s -rA tests/test_engine_cuda.py
      phase parity1_default 200 python3 scripts/debug_parity_one_step.py --device cuda
      phase parity8_default 200 python3 scripts/debug_parity_seq8.py --device cuda
      phase run_custom_50 300 python3 scripts/run_custom_50.py
      phase direct_500 300 python3 scripts/direct_custom_decode_500.py
      cp output/run_custom_50.* output/direct_custom_decode_500.* "$LOGS/" 2>/dev/null
      ;;
    kernels)
      phase pytest_kernels 330 python3 -m pytest -m cuda -q -n 16 tests/test_kernels_cuda.py
      ;;
    batch)
      phase pytest_batch 240 python3 -m pytest -m cuda -q -rA tests/test_batching_cuda.py
      ;;
    model)
      phase pytest_engine 240 python3 -m pytest -m cuda -q -rA tests/test_engine_cuda.py
      phase parity1_default 120 python3 scripts/debug_parity_one_step.py --device cuda
      phase parity8_default 120 python3 scripts/debug_parity_seq8.py --device cuda
      phase parity1_hd128 120 python3 scripts/debug_parity_one_step.py --device cuda --model random:tiny-hd128
      phase run_custom_50 150 python3 scripts/run_custom_50.py
      cp output/run_custom_50.* "$LOGS/" 2>/dev/null
      ;;
    batchbench)
      phase bench_batch 420 python3 scripts/bench_batch.py ${BATCH_ARGS:-}
      cp output/bench/batch_*.json "$LOGS/" 2>/dev/null; cp output/bench/batch_*.json "$OUT/" 2>/dev/null
      ;;
    changed)
      phase pytest_new 200 python3 -m pytest -m cuda -q -n 8 -rf tests/test_sampling_cuda.py
      phase pytest_changed 300 python3 -m pytest -m cuda -q -n 16 tests/test_kernels_cuda.py -k "attention or sample or pdl or linear or norm or graph"
      ;;
    direct)
      phase direct_500 150 python3 scripts/direct_custom_decode_500.py
      cp output/direct_custom_decode_500.json "$LOGS/direct_500_after.json" 2>/dev/null
      phase direct_500_before 150 python3 scripts/direct_custom_decode_500.py --capture-before-kv-init
      cp output/direct_custom_decode_500.json "$LOGS/direct_500_before.json" 2>/dev/null
      ;;
    api)
      phase pytest_api 300 python3 -m pytest -m cuda -q -s -rA tests/test_api_cuda.py
      ;;
    serve)
      # A random model has no tokenizer: the default model's (its prepared directory) or $TOKENIZER.
      tok=${TOKENIZER:-$(python3 -c 'from graphserver.prepare import resolve_model; print(resolve_model(None).tokenizer_path)')}
      touch "$LOGS/.serve_start"  # only this run's records go back (the device tool returns few files)
      for n in ${API_SERVERS:-1 4}; do
        phase bench_serve_default_api$n 300 python3 scripts/bench_serve.py --api-servers "$n"
        phase bench_serve_1b_api$n 300 python3 scripts/bench_serve.py --api-servers "$n" --model random:llama-3.2-1b \
          --tokenizer "$tok"
      done
      find output/bench -maxdepth 1 -name 'serve_*' -newer "$LOGS/.serve_start" -exec cp {} "$LOGS/" \; -exec cp {} "$OUT/" \;
      ;;
    bench)
      phase bench_kernels 400 python3 scripts/bench_kernels.py
      phase bench_decode 560 python3 scripts/bench_decode.py ${BENCH_ARGS:-}
      cp output/bench/*.json "$LOGS/" 2>/dev/null
      ;;
    *) echo "gpu_suite: unknown phase '$what'" >&2; exit 2 ;;  # checked above; kept for safety
  esac
done
tar czf "$OUT/gpu_logs.tgz" -C "$LOGS" . 2>/dev/null
echo "==== summary ($(python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
printf '%s\n' "${summary[@]}"
