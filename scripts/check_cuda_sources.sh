#!/usr/bin/env bash
# Compile-checks every custom_kernels/csrc/*.cu with bare nvcc for sm_90a (H100/H200), the flags
# setup.py uses. The .cu files include neither torch nor cuBLAS headers, so this runs on a machine
# with nvcc and no GPU (CI). Prints one line per file; exits non-zero if any file fails.
#
#   bash scripts/check_cuda_sources.sh            # all files
#   NVCC=/path/to/nvcc ARCH=90a bash scripts/check_cuda_sources.sh
set -u -o pipefail
case "${1:-}" in -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
csrc="$root/custom_kernels/csrc"
nvcc="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
arch="${ARCH:-90a}"

if [[ ! -x "$nvcc" ]]; then
  echo "check_cuda_sources: nvcc not found (set NVCC)" >&2
  exit 2
fi

shopt -s nullglob
files=("$csrc"/*.cu)
if (( ${#files[@]} == 0 )); then
  echo "check_cuda_sources: no .cu files under $csrc" >&2
  exit 2
fi

failed=0
for f in "${files[@]}"; do
  name="${f#"$root"/}"
  # The -D flags are the ones torch's BuildExtension adds to every nvcc call: no implicit
  # half / bfloat16 conversions or operators, so the check fails where the real build would.
  if log="$("$nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
        -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
        -gencode "arch=compute_${arch},code=sm_${arch}" -c -o /dev/null "$f" 2>&1)"; then
    echo "OK   $name"
  else
    echo "FAIL $name"
    echo "$log" | sed 's/^/     /'
    failed=1
  fi
done
exit "$failed"
