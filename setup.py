"""Builds custom_kernels._C when a CUDA build of torch and nvcc are present; otherwise installs the
pure-Python package (the CPU reference backend) and says so in one line."""
import glob
import os
import shutil
import sys

from setuptools import setup


def _torch_cxx_runtime():
    """Path of the shared libstdc++ this (torch-importing) process loaded, or None.

    The extension must use torch's C++ runtime, not a copy of its own: a compiler wrapper whose
    library directory holds only libstdc++.a (as on the GPU machine) makes `-lstdc++` link the
    static archive into _C.so. The two copies then disagree on iostream locale state, and the
    first TORCH_CHECK message that formats a number segfaulted in num_put instead of raising.
    Naming the loaded .so on the link line resolves those symbols there first, so the archive
    contributes nothing."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:  # not Linux: nothing to pin
        return None
    return sorted(paths)[0] if len(paths) == 1 else None


def _cuda_extension():
    """(ext_modules, cmdclass) for the kernels, or None with the reason they are skipped."""
    if os.environ.get("CUSTOM_KERNELS_SKIP_BUILD") == "1":
        return None, "CUSTOM_KERNELS_SKIP_BUILD=1"
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension, CUDA_HOME
    except ImportError:
        return None, "torch is not importable in the build environment"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return None, "nvcc was not found (set CUDA_HOME)"
    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("custom_kernels", "csrc")
    sources = sorted(glob.glob(os.path.join(root, csrc, "*.cu")) +
                     glob.glob(os.path.join(root, csrc, "*.cpp")))
    sources = [os.path.relpath(s, root) for s in sources]
    # Hopper by default (the GPUs this is built for); TORCH_CUDA_ARCH_LIST overrides.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    cxx_runtime = _torch_cxx_runtime()
    ext = CUDAExtension(
        extra_link_args=[cxx_runtime] if cxx_runtime else [],
        name="custom_kernels._C",
        sources=sources,
        libraries=["cublas"],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo",
                     "--expt-relaxed-constexpr"],
        },
    )
    return ([ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}), None


built, reason = _cuda_extension()
if built is None:
    print(f"custom_kernels: CUDA extension skipped ({reason}); CPU reference backend only.",
          file=sys.stderr)
    setup()
else:
    ext_modules, cmdclass = built
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
