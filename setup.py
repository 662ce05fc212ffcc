"""Build ``kernels._C`` from ``csrc/``.

C++ CPU sources (``csrc/*.cpp``) are always compiled. CUDA sources (``csrc/cuda/*.cu``) are compiled
when a CUDA toolkit and a CUDA build of torch are both present; ``KERNELS_BUILD_CUDA=1`` forces them
(fails loudly if impossible), ``KERNELS_BUILD_CUDA=0`` skips them.

torch must already be installed: build with ``pip install --no-build-isolation -e .``.
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit by a wrong install command
    raise SystemExit(
        "setup.py needs torch to build kernels._C: install it first "
        "(pip install -r requirements.txt) and build with `pip install --no-build-isolation -e .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("KERNELS_BUILD_CUDA", "").strip()
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not available:
            raise SystemExit(
                "KERNELS_BUILD_CUDA=1 but no CUDA build is possible: "
                f"CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r}"
            )
        return True
    return available


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link = ["-fopenmp"]
    include = [os.path.join(HERE, "csrc")]
    if _want_cuda() and cu:
        return CUDAExtension(
            "kernels._C",
            cpp + cu,
            include_dirs=include,
            define_macros=[("KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link,
        )
    return CppExtension(
        "kernels._C", cpp, include_dirs=include, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link
    )


setup(
    name="ssl-engine",
    version="0.1.0",
    description="Fast self-supervised visual pre-training: BEiT, BEiT v2, SimMIM, SparK, DINO",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    package_data={"engine": ["configs/*.yaml", "data/README.md"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "pyyaml"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
