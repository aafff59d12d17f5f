"""CI check of a built wheel: it contains the nvcc-built extension, that extension imports from the unpacked
wheel (not from the editable checkout), its ops are registered, and fake-tensor shape inference works; the
C sources of the CPU clip search are in it and build from the unpacked wheel.

    python .ci/check_wheel.py dist/moeq-*.whl
"""

import sys
import tempfile
import zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
names = zipfile.ZipFile(wheel).namelist()
so = [n for n in names if n.startswith("moeq_kernels/_C") and n.endswith(".so")]
assert so, f"{wheel.name} has no compiled extension moeq_kernels/_C*.so"
native = {"moeq/quantizers/native/" + f for f in ("clip_screen.c", "clip_screen_rows.h", "rtn_codes.c", "threads.h", "vec.h")}
assert native <= set(names), f"{wheel.name} lacks the C sources compiled on first use: {sorted(native - set(names))}"
root = Path(tempfile.mkdtemp())
zipfile.ZipFile(wheel).extractall(root)
# import from the unpacked wheel only: drop the editable install's finders and the checkout from sys.path
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.path = [str(root)] + [p for p in sys.path if p and Path(p).resolve() != Path.cwd().resolve()]

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import moeq_kernels  # noqa: E402

assert Path(moeq_kernels.__file__).resolve().is_relative_to(root.resolve()), moeq_kernels.__file__
from moeq_kernels import _cuda  # noqa: E402

assert _cuda.load(), "the wheel's extension did not load"
for op in ("dequantize", "fused_experts_decode", "hadamard_transform"):
    assert hasattr(torch.ops.moeq_C, op), f"moeq_C::{op} not registered"
assert "cuda" in moeq_kernels.describe()["dequantize"]
with FakeTensorMode():
    q = torch.empty(2, 8, 16, dtype=torch.int32, device="cuda")
    s = torch.empty(2, 8, 1, dtype=torch.bfloat16, device="cuda")
    out = torch.ops.moeq_C.dequantize(q, s, None, 4, -1)
assert out.shape == (2, 8, 128) and out.dtype == torch.bfloat16
print(f"wheel ok: {wheel.name} ({so[0]}), moeq_C ops registered, fake shape inference {tuple(out.shape)}")

from moeq.quantizers import clip_native  # noqa: E402

assert Path(clip_native.__file__).resolve().is_relative_to(root.resolve()), clip_native.__file__
assert clip_native.load() is not None, "the wheel's C sources (moeq/quantizers/native) did not build"
print("wheel ok: the CPU clip search's C sources build from the wheel")
