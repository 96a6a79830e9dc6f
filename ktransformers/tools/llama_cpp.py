"""llama.cpp's tools built from source, for the demo model's quantization and the head-to-head benchmark.

The sources are the ones the llama-cpp-python sdist on PyPI vendors (`llama_cpp_source`); `build`
compiles named targets with cmake; `pack_source` writes the part of the tree cmake needs as a
tarball (~5 MB instead of the sdist's 75) for a machine that cannot reach PyPI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# What cmake reads for the library, the CPU and CUDA backends and the tools (not the server's web UI).
SOURCE_PARTS = ("CMakeLists.txt", "cmake", "include", "src", "common", "vendor", "licenses", "LICENSE",
                "ggml/CMakeLists.txt", "ggml/cmake", "ggml/include", "ggml/src", "tools")
SKIPPED = ("tools/server", "tools/ui", "ggml/src/ggml-vulkan", "ggml/src/ggml-sycl", "ggml/src/ggml-opencl",
           "ggml/src/ggml-hexagon", "ggml/src/ggml-metal", "ggml/src/ggml-cann", "ggml/src/ggml-musa")
# Only what a tool needs: no tests, examples, server, unified app or downloads.
BASE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]


def llama_cpp_source(work: Path) -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python sdist, downloaded into and extracted under `work`."""
    work.mkdir(parents=True, exist_ok=True)
    if not list(work.glob("llama_cpp_python-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", str(work)], check=True)
    sdist = sorted(work.glob("llama_cpp_python-*.tar.gz"))[-1]
    source = work / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not source.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
    return source


def build(source: Path, build_dir: Path, targets: list[str], options: list[str] = ()) -> Path:
    """Build `targets` of the llama.cpp tree `source` in `build_dir` (once); returns its bin directory."""
    bin_dir = Path(build_dir) / "bin"
    if not all((bin_dir / target).exists() for target in targets):
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *BASE_OPTIONS, *options], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2), "--target", *targets],
                       check=True)
    return bin_dir


def pack_source(source: Path, archive: Path) -> Path:
    """A .tar.gz of the part of `source` that `build` needs, unpacked by `unpack_source`."""
    def keep(info: tarfile.TarInfo):
        name = info.name.removeprefix("llama.cpp/")
        return None if any(name == s or name.startswith(s + "/") for s in SKIPPED) else info

    with tarfile.open(archive, "w:gz") as out:
        for part in SOURCE_PARTS:
            if (source / part).exists():
                out.add(source / part, arcname=f"llama.cpp/{part}", filter=keep)
    return archive


def unpack_source(archive: Path, into: Path) -> Path:
    """The tree `pack_source` wrote, extracted under `into` (once)."""
    source = Path(into) / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        with tarfile.open(archive) as packed:
            packed.extractall(into, filter="data")
    return source
