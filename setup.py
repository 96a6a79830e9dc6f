"""Package + native CPU kernel build (see ktransformers/kernels).

The extension ktransformers.kernels._cpu compiles every csrc/*.cpp with portable flags (no
-march=native): the AVX2 and AVX512-VNNI kernel files pick their ISA with `#pragma GCC target`
and the module chooses between them at run time, so one build imports on any x86-64.
Rebuild in place with `python setup.py build_ext --inplace -q`.
"""

import os
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

ParallelCompile("KT_BUILD_JOBS", default=2).install()

cpu_kernels = Pybind11Extension(
    "ktransformers.kernels._cpu",
    sorted(glob("ktransformers/kernels/csrc/*.cpp")),
    include_dirs=["ktransformers/kernels/csrc"],
    depends=sorted(glob("ktransformers/kernels/csrc/*.h") + glob("ktransformers/kernels/csrc/*.inc")),
    cxx_std=17,
    extra_compile_args=["-O3", "-fno-math-errno", "-Wno-psabi"],
    define_macros=[("KT_NO_LOWBIT", "1")] if os.environ.get("KT_NO_LOWBIT") == "1" else [],
    extra_link_args=["-pthread"],
)

setup(
    name="ktransformers",
    version="0.2.1.post1",
    description="DeepSeek-V3/R1 MoE inference from GGUF on one workstation, served over an OpenAI-compatible API",
    packages=find_packages(include=["ktransformers", "ktransformers.*"]),
    package_data={"ktransformers": ["optimize/rules/*.yaml", "demo/model/*.json", "demo/model/*.gguf"]},
    ext_modules=[cpu_kernels],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
)
