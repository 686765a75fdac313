"""Build cpd_fast._C (C++ always, CUDA when available) and map kernels/ to cpd_fast.kernels.

CUDA sources are compiled when the installed torch has CUDA and nvcc is found, or when
FORCE_CUDA=1. TORCH_CUDA_ARCH_LIST is respected (default "8.0;9.0").
"""

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "cpd_fast compiles against your installed torch, which was not found.\n"
        "Install torch first (CPU example: pip install torch==2.13.0), then build without isolation:\n"
        '    pip install --no-build-isolation -e ".[rl,dev]"'
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # -ffp-contract=off: no FMA contraction, so every ISA variant rounds the same way;
    # -fno-trapping-math: lets branch-free selects vectorise (we never read FP exception flags).
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-trapping-math"]
    if platform.system() == "Linux":
        # at::parallel_for expands OpenMP pragmas in our translation units; the symbols resolve
        # against the libgomp that torch already loaded, so we do not link a second runtime.
        cxx.append("-fopenmp")
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "cpd_fast._C",
            cpu_sources + cuda_sources,
            define_macros=[("CPD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
        )
    return CppExtension("cpd_fast._C", cpu_sources, extra_compile_args={"cxx": cxx})


setup(
    packages=[*find_packages(include=["cpd_fast", "cpd_fast.*"]), "cpd_fast.kernels"],
    package_dir={"cpd_fast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
