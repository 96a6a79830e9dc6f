"""Package + native CPU kernel build (see ktransformers/kernels)."""

from setuptools import find_packages, setup

setup(
    name="ktransformers",
    version="0.2.1.post1",
    description="DeepSeek-V3/R1 MoE inference from GGUF on one workstation, served over an OpenAI-compatible API",
    packages=find_packages(include=["ktransformers", "ktransformers.*"]),
    package_data={"ktransformers": ["optimize/rules/*.yaml"]},
    python_requires=">=3.10",
)
