"""pytest-benchmark microbenchmarks of moeq's ops, one per (op, shape, backend).

    python -m pytest benchmarks --benchmark-only                          # GPU: registry shapes; CPU: tiny ones
    python -m pytest benchmarks --benchmark-only --benchmark-json=ops.json -k fused_experts

Ops: ``moeq::dequantize`` (a gate_up stack), ``moeq::fused_experts`` (with / without online Hadamard),
``moeq::hadamard_transform`` and the routing sort ``moe_align`` (when triton is installed); every backend that
``backends.backend_for`` accepts for the call. On a GPU the shapes are the anchors' four real models
(``benchmarks/shapes.py``); on a CPU their scaled-down twins. Each benchmarked call cycles over a few fresh
input sets; on a GPU the calls are captured in one CUDA graph and the benchmark times replays (+ a sync), so
host launch overhead stays out; non-capturable calls (the reference backends sync with the host) run eagerly.
``extra_info`` of every benchmark: per-call us, GB/s of the bytes the op must move, TFLOP/s where it
computes, and the fraction of the device's copy bandwidth (one large device-to-device copy per session).
This module lives outside ``tests/`` so ``python -m pytest tests`` never collects it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_common as bc  # noqa: E402
from benchmarks.shapes import ANCHOR_SHAPES, get_shape  # noqa: E402
from moeq.config import WeightSpec  # noqa: E402
from moeq.nn.experts import QuantizedExperts  # noqa: E402
from moeq_kernels import backends, ops  # noqa: E402,F401  (ops registers the custom ops)
from moeq_kernels.hadamard import hadamard_transform  # noqa: E402,F401  (registers moeq::hadamard_transform)

try:  # the grouped path's routing sort (imported lazily by the Triton backend otherwise)
    from moeq_kernels.triton.moe_align import moe_align_torch, moe_align_triton
except ImportError:
    moe_align_torch = moe_align_triton = None

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16
SHAPES = [get_shape(n) if GPU else get_shape(n).scaled() for n in ANCHOR_SHAPES]
TOKENS = (1, 128) if GPU else (1, 16)
HADAMARD_ROWS = (16, 16384) if GPU else (16, 256)
SETS = 3
SPEC = WeightSpec(4, 128, True)


@pytest.fixture(scope="session")
def copy_bw() -> float:
    """Bytes/s (read + written) of a large device-to-device copy on this device, measured once."""
    return bc.measure_copy_bandwidth(DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _quiet_cpu():
    # One intra-op thread on CPU: see bench_common.cpu_threads (shared small machines swing 10x otherwise).
    with bc.cpu_threads(None if GPU else 1), torch.inference_mode():
        yield


def _accepted(op: str, **attrs) -> list[str]:
    names = []
    for name in backends.BACKENDS:
        if name in backends.registered(op):
            try:
                backends.backend_for(op, DEVICE, requested=name, **attrs)
                names.append(name)
            except RuntimeError:
                continue
    return names


def _runner(calls: list, capturable: bool):
    """``(run, label)``: ``run()`` executes every call once (graph replay on a GPU when capturable)."""
    def eager():
        for c in calls:
            c()
        if GPU:
            torch.cuda.synchronize()

    eager()  # warm-up: JIT compiles and autotuning before any capture
    if not (GPU and capturable):
        return eager, "eager" if GPU else "CPU (not comparable)"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            eager()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
    except RuntimeError as exc:
        bc.logger.warning("capture failed (%s): timing eagerly", str(exc).splitlines()[0])
        torch.cuda.synchronize()
        return eager, "eager (capture failed)"

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    return replay, "cuda-graph"


def _bench(benchmark, calls: list, nbytes: float, flops: float | None, copy_bw: float, capturable: bool,
           slow: bool = False) -> None:
    run, label = _runner(calls, capturable)
    benchmark.pedantic(run, rounds=3 if slow or not GPU else 20, iterations=1, warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # --benchmark-disable
        return
    sec = stats.median / len(calls)
    benchmark.extra_info.update(us=sec * 1e6, gbps=nbytes / sec / 1e9, frac_copy_bw=nbytes / sec / copy_bw,
                                tflops=None if flops is None else flops / sec / 1e12, timing=label)


def _shape_ids(s) -> str:
    return s.name


def _packed_module(shape) -> QuantizedExperts:
    e, h, i, _ = shape.ehik
    m = QuantizedExperts(e, h, i, SPEC, SPEC, DTYPE, "silu", False, "auto", device=DEVICE)
    bc.fill_random_packed_(m)
    return m


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_ids)
def test_dequantize(benchmark, shape, backend, copy_bw):
    """``moeq::dequantize`` of a gate_up stack ``[E', 2I, H]`` (E' = min(E, 8); one expert for the reference
    backend on a GPU, whose int64 unpacking would need ~16x the packed bytes)."""
    e, h, i, _ = shape.ehik
    g = h // SPEC.group_size
    if backend not in _accepted("dequantize", bits=4, group_size=SPEC.group_size, dtype=DTYPE):
        pytest.skip(f"backend {backend} does not run this call here")
    ne = 1 if backend == "reference" and GPU else min(e, 8)
    packed_bytes = ne * 2 * i * (h // 2 + g * 2)
    sets = []
    for _ in range(SETS if packed_bytes < (64 << 20) else 1):  # big stacks are far beyond L2 already
        q = torch.empty(ne, 2 * i, h // 8, dtype=torch.int32, device=DEVICE)
        q.view(torch.uint8).random_(0, 256)
        sets.append((q, torch.randn(ne, 2 * i, g, device=DEVICE).mul_(0.01).to(DTYPE)))
    calls = [lambda q=q, s=s: torch.ops.moeq.dequantize(q, s, None, 4, SPEC.group_size, backend) for q, s in sets]
    _bench(benchmark, calls, packed_bytes + ne * 2 * i * h * 2, None, copy_bw, True, slow=backend == "reference")
    benchmark.extra_info.update(backend=backend, experts=ne)


def _fused_cases():
    for s in SHAPES:
        for t in TOKENS:
            for had in (False, True):
                for b in backends.BACKENDS:
                    yield pytest.param(s, t, had, b, id=f"{s.name}-T{t}-{'H-' if had else ''}{b}")


@pytest.mark.parametrize("shape,t,hadamard,backend", list(_fused_cases()))
def test_fused_experts(benchmark, shape, t, hadamard, backend, copy_bw):
    """``moeq::fused_experts`` INT4 g128 at T tokens, random top-k routing, bf16 activations."""
    e, h, i, k = shape.ehik
    attrs = {"w13_bits": 4, "w2_bits": 4, "w13_group_size": 128, "w2_group_size": 128, "hidden_dim": h,
             "intermediate_dim": i, "num_tokens": t, "zeros": False, "online_hadamard": hadamard, "dtype": DTYPE}
    if backend not in _accepted("fused_experts", **attrs):
        pytest.skip(f"backend {backend} does not run this call here")
    if backend == "reference" and GPU and t > 1:
        pytest.skip("the reference backend is timed at T=1 only on a GPU (a per-expert Python loop)")
    m = _packed_module(shape)
    m.online_hadamard, m.backend = hadamard, backend
    sets = []
    for _ in range(SETS):
        idx, w = bc.random_routing(t, e, k, DTYPE, DEVICE)
        sets.append((torch.randn(t, h, dtype=DTYPE, device=DEVICE), idx, w))
    touched = sum(len(torch.unique(s[1])) for s in sets) / SETS
    nbytes = touched * m.nbytes() / e + 2 * t * h * 2
    _bench(benchmark, [lambda s=s: m(*s) for s in sets], nbytes, 2 * t * k * 3 * h * i, copy_bw,
           backend != "reference", slow=backend == "reference")
    benchmark.extra_info.update(backend=backend, touched=touched)


def _hadamard_cases():
    dims = sorted({s.intermediate for s in SHAPES})
    for n in dims:
        for rows in HADAMARD_ROWS:
            for b in backends.BACKENDS:
                yield pytest.param(n, rows, b, id=f"n{n}-rows{rows}-{b}")


@pytest.mark.parametrize("n,rows,backend", list(_hadamard_cases()))
def test_hadamard_transform(benchmark, n, rows, backend, copy_bw):
    """``moeq::hadamard_transform`` over the last dim (the experts' down input width), orthonormal scale."""
    if backend not in _accepted("hadamard_transform", n=n, dtype=DTYPE, explicit=True):
        pytest.skip(f"backend {backend} does not run this call here")
    xs = [torch.randn(rows, n, dtype=DTYPE, device=DEVICE) for _ in range(SETS)]
    calls = [lambda x=x: torch.ops.moeq.hadamard_transform(x, n ** -0.5, backend) for x in xs]
    _bench(benchmark, calls, 2 * rows * n * 2, None, copy_bw, True)
    benchmark.extra_info["backend"] = backend


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_ids)
@pytest.mark.parametrize("t", TOKENS)
def test_moe_align(benchmark, shape, t, copy_bw):
    """``moe_align``: sort T*k routing slots by expert into block_m-padded tiles (Triton on CUDA, its PyTorch
    twin on CPU)."""
    if moe_align_triton is None:
        pytest.skip("triton is not installed")
    align = moe_align_triton if GPU else moe_align_torch
    e, _, _, k = shape.ehik
    idx = [bc.random_routing(t, e, k, DTYPE, DEVICE)[0] for _ in range(SETS)]
    calls = [lambda i=i: align(i, e, 16) for i in idx]
    _bench(benchmark, calls, t * k * 8 * 2, None, copy_bw, True)
