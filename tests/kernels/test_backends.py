"""Backend dispatch rules and the custom ops' compile-time behaviour (fake impls, fullgraph tracing)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moeq_kernels import backends, ops
from moeq_kernels.packing import pack


def test_auto_picks_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backends.backend_for("dequantize", "cpu") == "reference"


def test_named_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="cannot run|has no implementation"):
        backends.backend_for("dequantize", "cpu", requested="cuda")


def test_unknown_op_lists_known_ops():
    with pytest.raises(KeyError, match="known ops"):
        backends.backend_for("nope", "cpu")


def test_register_rejects_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        backends.register("dequantize", "opencl")


def _inputs():
    qw = pack(torch.randint(0, 16, (4, 64, 64)), 4)
    s = torch.rand(4, 64, 2, dtype=torch.float16) + 0.1
    q2 = pack(torch.randint(0, 16, (4, 64, 32)), 4)
    s2 = torch.rand(4, 64, 1, dtype=torch.float16) + 0.1
    x = torch.randn(5, 64, dtype=torch.float16)
    idx = torch.randint(0, 4, (5, 2))
    w = torch.rand(5, 2)
    return x, idx, w, qw, s, None, q2, s2, None, 4, 32, 4, 32


def test_fake_impls_give_shapes_without_running():
    real = _inputs()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real]
        out = ops.fused_experts(*fake)
        deq = ops.dequantize(fake[3], fake[4], None, 4, 32)
    assert out.shape == (5, 64) and out.dtype == torch.float16
    assert deq.shape == (4, 64, 64) and deq.dtype == torch.float16


def test_opcheck_dequantize():
    qw = pack(torch.randint(0, 16, (2, 8, 32)), 4)
    s = torch.rand(2, 8, 1, dtype=torch.bfloat16) + 0.1
    torch.library.opcheck(torch.ops.moeq.dequantize.default, (qw, s, None, 4, 32, "reference"),
                          test_utils=("test_schema", "test_faketensor"))


def test_fullgraph_trace_of_the_op():
    # torch.compile must see the op as one opaque node (no graph break) — aot_eager keeps this test fast on CPU
    args = _inputs()

    def f(x, idx, w):
        return ops.fused_experts(x, idx, w, *args[3:], "silu", False, "reference") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(*args[:3]), f(*args[:3]))


def test_backward_refuses_with_a_clear_error():
    args = list(_inputs())
    args[0] = args[0].float().requires_grad_()
    out = ops.fused_experts(*args, "silu", False, "reference")
    with pytest.raises(RuntimeError, match="no backward"):
        out.sum().backward()
