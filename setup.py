"""Build of moeq: the pure-Python packages, plus the ``csrc/`` CUDA extension ``moeq_kernels._C`` when possible.

Metadata lives in pyproject.toml; this file only decides about the extension.

``MOEQ_BUILD_CUDA`` (environment):
    ``auto`` (default): build the extension when torch is importable in the build environment, is a CUDA
        build, and nvcc is found (``CUDA_HOME``/``CUDA_PATH``, else ``nvcc`` on PATH, else
        ``/usr/local/cuda``) with the same CUDA major version as torch; otherwise install pure Python and
        say why on stderr. An isolated build (plain ``pip install .``) has no torch, so it is pure Python:
        build the extension with ``pip install --no-build-isolation .``.
    ``1``: build the extension or fail with the reason.
    ``0``: never build it.

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``8.0;9.0+PTX``: Ampere and Hopper machine
code, plus Hopper PTX that newer GPUs compile at load). ``MAX_JOBS`` caps parallel compile jobs (ninja).
A compile error is always fatal, also under ``auto``: it is a bug to fix, not a missing toolchain.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
EXT_NAME = "moeq_kernels._C"
# Relative paths: setuptools refuses absolute source paths in some build modes.
EXT_SOURCES = ["csrc/ops.cpp", "csrc/dequant.cu", "csrc/moe_decode.cu", "csrc/hadamard.cu"]
# Ampere (sm_80 machine code also runs on 8.6 / 8.9) and Hopper. The +PTX keeps the build usable on GPUs
# newer than Hopper (the driver compiles the PTX) at almost no build cost. Needed as an explicit default:
# without a visible GPU (CI, build hosts) torch cannot pick an architecture and fails.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# No --use_fast_math: it flushes fp32 subnormals to zero, and bf16 scales times small codes land there,
# which would break bit-exactness with the reference (moeq_kernels.packing.dequantize).
# The C++ standard of csrc/ops.cpp is left to torch: it must match what torch's headers need (torch 2.14's
# use C++20 features and fail under -std=c++17). The .cu files include no torch header, so C++17 suffices.
# -g0 overrides the -g that Python's sysconfig CFLAGS add: debug info for torch's headers costs compile
# time and ~3 MB of .so for nothing we debug.
CXX_FLAGS = ["-O3", "-g0"]
NVCC_FLAGS = ["-O3", "-std=c++17"]


def _say(msg: str) -> None:
    print(f"moeq setup: {msg}", file=sys.stderr, flush=True)


def _build_mode() -> str:
    raw = os.environ.get("MOEQ_BUILD_CUDA", "auto").strip().lower()
    modes = {"": "auto", "auto": "auto", "1": "1", "true": "1", "yes": "1", "on": "1",
             "0": "0", "false": "0", "no": "0", "off": "0"}
    if raw not in modes:
        raise SystemExit(f"moeq setup: MOEQ_BUILD_CUDA={raw!r} is not one of auto, 1, 0")
    return modes[raw]


def _is_cuda_home(path: str | os.PathLike | None) -> bool:
    return bool(path) and (Path(path) / "bin" / "nvcc").exists() and (Path(path) / "include" / "cuda_runtime.h").exists()


def _find_cuda_home() -> tuple[str | None, str]:
    """The CUDA toolkit root, or None and why not.

    Differs from torch's own guess (parent of ``which nvcc``) only where that guess is wrong: when ``nvcc``
    on PATH is a wrapper script or symlink outside the toolkit (e.g. ``/usr/local/bin/nvcc``), torch
    would take ``/usr/local`` and then miss the CUDA headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_cuda_home(value):
                return value, ""
            return None, f"{var}={value} has no bin/nvcc and include/cuda_runtime.h"
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).parent.parent, Path(os.path.realpath(nvcc)).parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    for cand in candidates:
        if _is_cuda_home(cand):
            return str(cand), ""
    return None, "nvcc not found (set CUDA_HOME, or put the CUDA toolkit's nvcc on PATH)"


def _nvcc_release(cuda_home: str) -> str | None:
    """``"13.0"`` from ``nvcc --version``, or None when it cannot be read."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _cuda_build_blocker() -> tuple[str | None, str | None]:
    """(None, cuda_home) when the extension can be built, else (reason, None)."""
    try:
        import torch
    except ImportError as exc:
        return (f"torch is not importable in the build environment ({exc}); an isolated build never has it, "
                "use `pip install --no-build-isolation .`"), None
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build", None
    cuda_home, why = _find_cuda_home()
    if cuda_home is None:
        return why, None
    release = _nvcc_release(cuda_home)
    if release is None:
        return f"could not read the CUDA version from {cuda_home}/bin/nvcc --version", None
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc in {cuda_home} is CUDA {release} but torch {torch.__version__} was built with CUDA "
                f"{torch.version.cuda}; the major versions must match"), None
    return None, cuda_home


def _extension_config() -> dict:
    """``setup()`` keyword arguments for the extension: empty for a pure-Python install."""
    mode = _build_mode()
    if mode == "0":
        _say("MOEQ_BUILD_CUDA=0: not building the CUDA extension; installing pure Python")
        return {}
    blocker, cuda_home = _cuda_build_blocker()
    if blocker is not None:
        if mode == "1":
            raise SystemExit(f"moeq setup: MOEQ_BUILD_CUDA=1 but the CUDA extension cannot be built: {blocker}")
        _say(f"not building the CUDA extension: {blocker}; installing pure Python (MOEQ_BUILD_CUDA=1 makes this an error)")
        return {}

    # torch.utils.cpp_extension reads CUDA_HOME when first imported; set it first so the toolkit found
    # above (not torch's guess) supplies nvcc, headers and libcudart.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension, is_ninja_available

    if not is_ninja_available():
        _say("ninja not found: compiling serially (pip install ninja for parallel builds; MAX_JOBS caps them)")
    _say(f"building {EXT_NAME} with {cuda_home}/bin/nvcc for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        name=EXT_NAME,
        sources=EXT_SOURCES,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_config())
