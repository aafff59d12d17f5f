"""Tests of the compiled CUDA extension ``moeq_kernels._C`` (``csrc/``) and its loader ``moeq_kernels._cuda``.

Three tiers: loader behaviour (always runs), registration / shape inference / input checks (need the
extension built, no GPU: the C++ checks run on CPU tensors because the op's CPU registration validates
before refusing), and bit-exactness against the reference ``moeq_kernels.packing.dequantize`` (need a GPU).
"""

from __future__ import annotations

import logging

import pytest
import torch

import moeq_kernels  # noqa: F401  (imports ops, which calls _cuda.load())
from moeq_kernels import _cuda, backends, ops
from moeq_kernels.packing import dequantize as dequantize_ref
from moeq_kernels.packing import pack

HAS_EXT = _cuda.load()
HAS_GPU = torch.cuda.is_available()

needs_ext = pytest.mark.skipif(
    not HAS_EXT,
    reason="moeq_kernels._C is not built (build it with `pip install --no-build-isolation -e .` where torch is a "
    "CUDA build and nvcc is installed)",
)
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def _stack(e, n, k, bits, group_size, dtype=torch.float16, asym=False, device="cpu", seed=0):
    """Random packed stack ``(qweight, scales, qzeros)``; scales include zero, negatives, subnormals and
    values whose products overflow, so rounding and flush-to-zero differences would show."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    qweight = pack(torch.randint(0, 2**bits, (e, n, k), generator=gen), bits)
    scales = torch.randn(e, n, groups, generator=gen) * 0.02
    fi = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.5, fi.smallest_normal / 8, fi.smallest_normal, fi.max / 4, 1e-3])
    flat = scales.view(-1)
    flat[: min(flat.numel(), special.numel())] = special[: flat.numel()]
    qzeros = torch.randint(0, 2**bits, (e, n, groups), generator=gen, dtype=torch.uint8) if asym else None
    move = (lambda t: t.to(device)) if device != "cpu" else (lambda t: t)
    return move(qweight), move(scales.to(dtype)), None if qzeros is None else move(qzeros)


# ---------------------------------------------------------------- loader (always)


def test_cuda_backend_registered_iff_extension_loaded():
    assert ("cuda" in backends.describe()["dequantize"]) == HAS_EXT


@pytest.mark.parametrize(
    "error, level",
    [
        (ImportError("_C.so: undefined symbol: _ZN3c106detail14torchCheckFail"), logging.WARNING),
        (ModuleNotFoundError("No module named 'some_dep'", name="some_dep"), logging.WARNING),
        (ModuleNotFoundError("No module named 'moeq_kernels._C'", name="moeq_kernels._C"), logging.INFO),
    ],
)
def test_unloadable_extension_is_logged_and_skipped(monkeypatch, caplog, error, level):
    def broken():
        raise error

    monkeypatch.setattr(_cuda, "_import_extension", broken)
    with caplog.at_level(logging.INFO, logger="moeq_kernels._cuda"):
        assert _cuda._load() is False
    record = caplog.records[-1]
    assert record.levelno == level
    if level == logging.WARNING:
        assert str(error) in record.getMessage()  # the warning carries the import error's text


def test_supports_refuses_what_the_kernel_cannot_run():
    assert "CUDA tensors" in _cuda.dequantize_supports(torch.device("cpu"), bits=4, group_size=128)
    # Checked before the device is queried, so these run without a GPU.
    assert "bits=3" in _cuda.dequantize_supports(torch.device("cuda"), bits=3, group_size=128)
    assert "dtype" in _cuda.dequantize_supports(torch.device("cuda"), bits=4, group_size=128, dtype=torch.float32)


@needs_ext
def test_auto_never_picks_cuda_for_cpu_tensors():
    assert backends.backend_for("dequantize", "cpu", bits=4, group_size=32) != "cuda"
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        backends.backend_for("dequantize", "cpu", "cuda", bits=4, group_size=32)


# ---------------------------------------------------------------- registration and shapes (extension, no GPU)


@needs_ext
def test_op_schema_and_python_home():
    schema = str(torch.ops.moeq_C.dequantize.default._schema)
    assert schema == "moeq_C::dequantize(Tensor qweight, Tensor scales, Tensor? qzeros, int bits, int group_size) -> Tensor"
    pystub = torch._C._dispatch_pystub("moeq_C::dequantize", "")
    assert pystub is not None and pystub[0] == "moeq_kernels._cuda"


@needs_ext
@pytest.mark.parametrize("device", ["cuda", "meta"])
@pytest.mark.parametrize(
    "bits, k, group_size, dtype",
    [(4, 256, 128, torch.float16), (8, 96, 32, torch.bfloat16), (2, 64, -1, torch.float16), (4, 1408, 128, torch.bfloat16)],
)
def test_fake_shape_inference(device, bits, k, group_size, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    e, n = 3, 5
    groups = 1 if group_size == -1 else k // group_size
    with FakeTensorMode():  # fake CUDA tensors need no GPU
        qweight = torch.empty(e, n, k * bits // 32, dtype=torch.int32, device=device)
        scales = torch.empty(e, n, groups, dtype=dtype, device=device)
        qzeros = torch.empty(e, n, groups, dtype=torch.uint8, device=device)
        out = torch.ops.moeq_C.dequantize(qweight, scales, qzeros, bits, group_size)
    assert out.shape == (e, n, k) and out.dtype == dtype and out.device.type == device


@needs_ext
def test_traces_into_one_graph_node():
    from torch.fx.experimental.proxy_tensor import make_fx

    qweight, scales, _ = _stack(3, 5, 64, 4, 32)
    graph = make_fx(lambda q, s: torch.ops.moeq_C.dequantize(q, s, None, 4, 32) * 2, tracing_mode="fake")(qweight, scales)
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.moeq_C.dequantize.default in targets


@needs_ext
def test_fake_refuses_unsupported_bits():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qweight = torch.empty(1, 4, 3, dtype=torch.int32, device="cuda")
        scales = torch.empty(1, 4, 1, dtype=torch.float16, device="cuda")
        with pytest.raises(ValueError, match="bits=3"):
            torch.ops.moeq_C.dequantize(qweight, scales, None, 3, -1)


def _bad_calls():
    """(name, args, expected message) with CPU tensors: each is wrong in exactly one way."""
    q, s, z = _stack(3, 5, 64, 4, 32, asym=True)
    return [
        ("bits3", (q, s, z, 3, 32), "bits=3 is not supported"),
        ("qweight_dtype", (q.float(), s, z, 4, 32), "qweight must be int32, got Float"),
        ("qweight_dim", (q[0], s, z, 4, 32), r"qweight must be 3-D \[E, N, K \* bits / 32\], got shape \[5, 8\]"),
        ("qweight_stride", (q[..., ::2], s[..., :1], z[..., :1], 4, 32), "qweight must be contiguous along its last dim"),
        ("group_size", (q, s, z, 4, 48), "group_size=48 must be -1 .* positive divisor of K=64"),
        ("scales_dtype", (q, s.float(), z, 4, 32), "scales must be float16 or bfloat16, got Float"),
        ("scales_shape", (q, s[..., :1], z, 4, 32), r"scales must have shape \[3, 5, 2\].*got \[3, 5, 1\]"),
        ("qzeros_dtype", (q, s, z.int(), 4, 32), "qzeros must be uint8, got Int"),
        ("qzeros_shape", (q, s, z[:2], 4, 32), r"qzeros must have shape \[3, 5, 2\] like scales, got \[2, 5, 2\]"),
        ("cpu", (q, s, z, 4, 32), "runs on CUDA tensors only; qweight is on cpu"),
    ]


@needs_ext
@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_shim_checks_name_the_problem(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        torch.ops.moeq_C.dequantize(*args)


# ---------------------------------------------------------------- bit-exactness (extension + GPU)


def _exact_cases():
    cases = []
    for bits in (4, 8, 2):
        for dtype in (torch.float16, torch.bfloat16):
            for asym in (False, True):
                for group_size in (32, 64, 128, -1):
                    if bits == 2 and group_size != 128:
                        continue  # 2-bit is optional in the format; one config per dtype / zero mode
                    cases.append((bits, dtype, asym, group_size))
    # Groups smaller than one word's values (allowed by the format): scale reloads inside a word.
    cases += [(4, torch.float16, True, 4), (8, torch.bfloat16, False, 2), (2, torch.float16, True, 8)]
    return cases


@needs_ext
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits, dtype, asym, group_size", _exact_cases())
@pytest.mark.parametrize("e, n", [(3, 7), (1, 1), (5, 33)])
def test_bit_exact_vs_reference(bits, dtype, asym, group_size, e, n):
    k = 384  # a multiple of 128 and of every word size; odd E and N leave no power-of-two alignment
    qweight, scales, qzeros = _stack(e, n, k, bits, group_size, dtype, asym, seed=bits * 1000 + e * 10 + n)
    expected = dequantize_ref(qweight, scales, qzeros, bits, group_size)
    got = torch.ops.moeq_C.dequantize(qweight.cuda(), scales.cuda(), None if qzeros is None else qzeros.cuda(), bits, group_size)
    assert got.dtype == dtype and got.shape == (e, n, k) and got.is_contiguous()
    # torch.equal treats NaN as unequal; none arise (scales finite, codes finite). inf == inf holds.
    assert torch.equal(got.cpu(), expected)


@needs_ext
@needs_gpu
@pytest.mark.gpu
def test_strided_views_match_reference():
    qweight, scales, qzeros = _stack(4, 10, 256, 4, 64, torch.bfloat16, asym=True, device="cuda")
    # Every other row of qweight (rows not adjacent), scales / zeros stored transposed.
    q = qweight[:, ::2]
    s = scales.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]
    z = qzeros.transpose(1, 2).contiguous().transpose(1, 2)[:, ::2]
    assert not s.is_contiguous() and not z.is_contiguous()
    expected = dequantize_ref(q.contiguous(), s.contiguous(), z.contiguous(), 4, 64)
    assert torch.equal(torch.ops.moeq_C.dequantize(q, s, z, 4, 64), expected)


@needs_ext
@needs_gpu
@pytest.mark.gpu
def test_grid_stride_loop_covers_large_stacks():
    # 9 * 4096 * 512 words > 2^16 blocks * 256 threads: every thread handles more than one word.
    qweight, scales, qzeros = _stack(9, 4096, 4096, 4, 128, torch.float16, asym=True, device="cuda")
    expected = dequantize_ref(qweight, scales, qzeros, 4, 128)
    assert torch.equal(torch.ops.moeq_C.dequantize(qweight, scales, qzeros, 4, 128), expected)


@needs_ext
@needs_gpu
@pytest.mark.gpu
def test_empty_stack_and_device_mismatch():
    qweight, scales, _ = _stack(0, 4, 64, 4, 32, device="cuda")
    assert torch.ops.moeq_C.dequantize(qweight, scales, None, 4, 32).shape == (0, 4, 64)
    qweight, scales, _ = _stack(2, 4, 64, 4, 32, device="cuda")
    with pytest.raises(RuntimeError, match="scales must be on cuda:0 like qweight, got cpu"):
        torch.ops.moeq_C.dequantize(qweight, scales.cpu(), None, 4, 32)


@needs_ext
@needs_gpu
@pytest.mark.gpu
def test_public_op_dispatches_to_cuda_and_matches():
    qweight, scales, qzeros = _stack(3, 7, 256, 4, 128, torch.bfloat16, asym=True, device="cuda")
    assert backends.backend_for("dequantize", qweight.device, bits=4, group_size=128) == "cuda"
    expected = dequantize_ref(qweight, scales, qzeros, 4, 128)
    assert torch.equal(ops.dequantize(qweight, scales, qzeros, 4, 128, backend="cuda"), expected)
    assert torch.equal(ops.dequantize(qweight, scales, qzeros, 4, 128), expected)


@needs_ext
@needs_gpu
@pytest.mark.gpu
def test_opcheck():
    qweight, scales, qzeros = _stack(3, 7, 256, 4, 64, torch.float16, asym=True, device="cuda")
    # No autograd registration check: no input of a dequantize can require grad (codes are integers).
    torch.library.opcheck(
        torch.ops.moeq_C.dequantize.default, (qweight, scales, qzeros, 4, 64),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
