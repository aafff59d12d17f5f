"""Tests of the CUDA decode MoE kernels and Hadamard op (``csrc/moe_decode.cu``, ``csrc/hadamard.cu``).

Tiers:

* always: the ``supports`` predicates of the ``cuda`` backends (their reasons);
* extension built, no GPU: op schemas and registration, fake implementations under FakeTensorMode, and the
  C++ shim's input checks (the ops' CPU registrations validate before refusing, so they run on CPU tensors);
* no GPU, g++ present: the kernel sources run on the CPU emulation in ``tests/kernels/cuda_emu`` (one fiber
  per CUDA thread, barriers and warp shuffles emulated, shared memory and outputs poisoned with NaN) and are
  compared with the references: same cases as the GPU tier, fewer of them;
* GPU: the compiled kernels against ``fused_experts_ref`` / ``hadamard_ref`` on fp32-upcast inputs
  (relative error < 1e-2 bf16, < 3e-3 fp16; outputs poisoned with NaN beforehand), CUDA-graph capture,
  opcheck.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import moeq_kernels  # noqa: F401  (imports ops, which calls _cuda.load())
from moeq_kernels import _cuda, backends, ops
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.hadamard import hadamard_transform
from moeq_kernels.packing import pack
from moeq_kernels.reference import fused_experts_ref, hadamard_ref

HAS_EXT = _cuda.load() and hasattr(torch.ops.moeq_C, "fused_experts_decode")
HAS_GPU = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent / "cuda_emu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="moeq_kernels._C with fused_experts_decode is not built")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------- inputs
def make_case(t, e, h, i, k, dtype=torch.bfloat16, g13=128, g2=128, asym=False, sentinel=False,
              ids_dtype=torch.int64, w_dtype=torch.float32, scale_dtype=None, device="cpu"):
    """Fresh random inputs of one fused_experts call (dict of the op's tensor arguments)."""
    scale_dtype = scale_dtype or dtype

    def stack(n, kk, g):
        gg = kk if g == -1 else g
        q = torch.randint(0, 16, (e, n, kk))
        s = ((torch.rand(e, n, kk // gg) + 0.5) / (kk ** 0.5 * 8)).to(scale_dtype)
        z = torch.randint(0, 16, (e, n, kk // gg), dtype=torch.uint8) if asym else None
        return pack(q, 4), s, z

    w13, w2 = stack(2 * i, h, g13), stack(h, i, g2)
    probs = torch.softmax(torch.randn(t, e), dim=-1)
    wts, ids = torch.topk(probs, k, dim=-1)
    wts, ids = (wts / wts.sum(-1, keepdim=True)).to(w_dtype), ids.to(ids_dtype)
    if sentinel:  # expert-parallel sentinels: one slot of token 0, every slot of token 1
        ids[0, -1] = -1
        if t > 1:
            ids[1, :] = e
    move = (lambda x: None if x is None else x.to(device))
    return dict(hidden=move(torch.randn(t, h).to(dtype)), ids=move(ids), wts=move(wts),
                w13=[move(x) for x in w13], w2=[move(x) for x in w2], g13=g13, g2=g2)


def reference(c, hadamard):
    """fused_experts_ref on fp32-upcast activations and routing weights (scales are upcast inside)."""
    cpu = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in c.items()}
    w13 = [None if x is None else x.cpu() for x in c["w13"]]
    w2 = [None if x is None else x.cpu() for x in c["w2"]]
    weights = ExpertWeights.from_op_args(*w13, *w2, 4, c["g13"], 4, c["g2"], "silu", hadamard)
    return fused_experts_ref(cpu["hidden"].float(), cpu["ids"], cpu["wts"].float(), weights)


def rel_err(got, ref):
    got = got.float().cpu()
    assert bool(torch.isfinite(got).all()), "non-finite output (an element was not written?)"
    return ((got - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# (T, E, H, I, k, options): the brief's shapes plus the edge cases.
MOE_CASES = [
    (1, 8, 256, 512, 2, {}),
    (3, 8, 256, 512, 2, {"dtype": torch.float16}),
    (16, 8, 256, 512, 2, {}),
    (3, 16, 512, 768, 4, {"hadamard": True}),                       # 768 = 12 * 64
    (1, 16, 512, 768, 4, {"hadamard": True, "dtype": torch.float16}),
    (3, 8, 256, 1408, 2, {"hadamard": True, "asym": True}),           # 1408 = 44 * 32
    (3, 8, 256, 512, 8, {}),                                         # top-k = E
    (1, 64, 256, 512, 4, {}),                                        # mostly empty experts
    (3, 8, 256, 512, 2, {"sentinel": True, "ids_dtype": torch.int32, "w_dtype": torch.bfloat16}),
    (3, 8, 256, 512, 2, {"asym": True, "g13": 32, "g2": 64}),
    (3, 8, 256, 512, 2, {"g13": -1, "g2": -1}),                      # per-channel
    (2, 4, 96, 160, 2, {"g13": 32, "g2": 32}),                       # H, I multiples of 32 only
    (1, 8, 256, 512, 2, {"scale_dtype": torch.float16}),             # bf16 activations, fp16 scales
    (16, 8, 256, 1024, 2, {"hadamard": True, "asym": True, "g2": 64}),
]
EMU_CASES = [MOE_CASES[j] for j in (0, 1, 2, 3, 5, 8, 9, 10, 11)]
HAD_SIZES = (256, 768, 1024, 1408, 14336)


def _split(opts):
    opts = dict(opts)
    return opts.pop("hadamard", False), opts


# ---------------------------------------------------------------------------------------------- supports
DECODE_ATTRS = dict(w13_bits=4, w2_bits=4, w13_group_size=128, w2_group_size=128, hidden_dim=4096,
                    intermediate_dim=14336, num_tokens=1, zeros=False, online_hadamard=True, dtype=torch.bfloat16)


@pytest.mark.parametrize("change, reason", [
    ({"num_tokens": 17}, "above the decode limit"),
    ({"w13_bits": 8}, "4-bit only"),
    ({"dtype": torch.float32}, "activation dtype"),
    ({"hidden_dim": 4100}, "multiples of 32"),
    ({"w2_group_size": 96}, "down group size 96"),
    ({"w13_group_size": 48}, "gate_up group size 48"),
    ({"intermediate_dim": 96 * 7, "w2_group_size": 32}, "online Hadamard"),
])
def test_fused_experts_supports_reasons(change, reason):
    attrs = {**DECODE_ATTRS, **change}
    assert reason in _cuda.fused_experts_supports(torch.device("cuda"), **attrs)


def test_supports_refuse_cpu_and_accept_per_channel():
    assert "CUDA tensors" in _cuda.fused_experts_supports(torch.device("cpu"), **DECODE_ATTRS)
    assert "CUDA tensors" in _cuda.fused_experts_supports(
        torch.device("cpu"), **{**DECODE_ATTRS, "w13_group_size": -1, "w2_group_size": 14336})
    assert "dtype" in _cuda.hadamard_supports(torch.device("cuda"), n=1024, dtype=torch.float64)
    assert "m*2^k" in _cuda.hadamard_supports(torch.device("cuda"), n=96 * 7, dtype=torch.float32)
    assert "CUDA tensors" in _cuda.hadamard_supports(torch.device("cpu"), n=14336, dtype=torch.bfloat16)


@needs_ext
def test_registered_and_never_auto_on_cpu():
    described = backends.describe()
    assert "cuda" in described["fused_experts"] and "cuda" in described["hadamard_transform"]
    assert backends.backend_for("fused_experts", "cpu", **DECODE_ATTRS) != "cuda"


# ---------------------------------------------------------------------------------------------- schemas, fakes, checks
@needs_ext
def test_schemas_and_python_home():
    assert str(torch.ops.moeq_C.fused_experts_decode.default._schema) == (
        "moeq_C::fused_experts_decode(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor w13_qweight, "
        "Tensor w13_scales, Tensor? w13_qzeros, Tensor w2_qweight, Tensor w2_scales, Tensor? w2_qzeros, "
        "int group_size13, int group_size2, bool online_hadamard) -> Tensor")
    assert str(torch.ops.moeq_C.hadamard_transform.default._schema) == (
        "moeq_C::hadamard_transform(Tensor x, float scale) -> Tensor")
    for name in ("fused_experts_decode", "hadamard_transform"):
        assert torch._C._dispatch_pystub(f"moeq_C::{name}", "")[0] == "moeq_kernels._cuda"


@needs_ext
@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_fake_shapes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    t, e, h, i, k = 3, 8, 256, 768, 2
    with FakeTensorMode():
        hidden = torch.empty(t, h, dtype=torch.bfloat16, device=device)
        ids = torch.empty(t, k, dtype=torch.int64, device=device)
        wts = torch.empty(t, k, dtype=torch.float32, device=device)
        q13 = torch.empty(e, 2 * i, h // 8, dtype=torch.int32, device=device)
        s13 = torch.empty(e, 2 * i, h // 128, dtype=torch.bfloat16, device=device)
        q2 = torch.empty(e, h, i // 8, dtype=torch.int32, device=device)
        s2 = torch.empty(e, h, i // 128, dtype=torch.bfloat16, device=device)
        out = torch.ops.moeq_C.fused_experts_decode(hidden, ids, wts, q13, s13, None, q2, s2, None, 128, 128, True)
        x = torch.empty(5, 7, 1408, dtype=torch.float16, device=device)
        y = torch.ops.moeq_C.hadamard_transform(x, 0.5)
    assert out.shape == (t, h) and out.dtype == torch.bfloat16 and out.device.type == device
    assert y.shape == x.shape and y.dtype == x.dtype


@needs_ext
def test_traces_into_one_graph_node():
    from torch.fx.experimental.proxy_tensor import make_fx

    c = make_case(2, 4, 64, 96, 2, g13=32, g2=32)
    fn = lambda x, i, w, q13, s13, q2, s2: torch.ops.moeq_C.fused_experts_decode(
        x, i, w, q13, s13, None, q2, s2, None, 32, 32, False) * 2
    graph = make_fx(fn, tracing_mode="fake")(c["hidden"], c["ids"], c["wts"], c["w13"][0], c["w13"][1], c["w2"][0],
                                             c["w2"][1])
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.moeq_C.fused_experts_decode.default in targets


def _bad_decode_calls():
    """(name, args, message) with CPU tensors, each wrong in exactly one way."""
    c = make_case(2, 4, 64, 96, 2, g13=32, g2=32, asym=True)
    odd = make_case(2, 4, 64, 288, 2, g13=32, g2=32)
    x, ids, w = c["hidden"], c["ids"], c["wts"]
    q13, s13, z13 = c["w13"]
    q2, s2, z2 = c["w2"]

    def args(**kw):
        base = dict(x=x, ids=ids, w=w, q13=q13, s13=s13, z13=z13, q2=q2, s2=s2, z2=z2, g13=32, g2=32, had=False)
        base.update(kw)
        return tuple(base.values())

    return [
        ("hidden_dtype", args(x=x.float()), "hidden must be float16 or bfloat16, got Float"),
        ("hidden_dim", args(x=x[0]), r"hidden must be 2-D \[T, H\]"),
        ("ids_shape", args(ids=ids[:1]), r"top_k_index must be \[T, k\] with T=2"),
        ("ids_float", args(ids=ids.float()), "top_k_index must be an integer tensor"),
        ("weights_shape", args(w=w[:, :1]), "top_k_weights must have the shape of top_k_index"),
        ("qweight_dtype", args(q13=q13.float()), "w13_qweight must be int32, got Float"),
        ("qweight_contig", args(q2=q2.transpose(0, 1)), "w2_qweight must be contiguous"),
        ("hidden_vs_w13", args(x=torch.randn(2, 32, dtype=x.dtype)), "w13_qweight holds K=64 .* hidden has H=32"),
        ("w13_rows", args(q13=q13[:, :100].contiguous()), r"w13_qweight must have 2 \* I = 192 rows"),
        ("group", args(g2=40), "group_size2=40 must be -1 or a positive divisor of I=96"),
        ("group_kernel", args(g13=16, s13=s13.repeat(1, 1, 2), z13=z13.repeat(1, 1, 2)),
         "gate_up group size must be 32 \\* 2\\^j"),
        ("scales_shape", args(s2=s2[..., :1]), r"w2_scales must have shape \[4, 64, 3\]"),
        ("scales_dtype", args(s13=s13.float()), "w13_scales must be float16 or bfloat16"),
        ("zeros_dtype", args(z2=z2.int()), "w2_qzeros must be uint8"),
        ("hadamard", (odd["hidden"], odd["ids"], odd["wts"], *odd["w13"], *odd["w2"], 32, 32, True),
         "online Hadamard needs I = m \\* 2\\^k"),  # I = 288 = 9 * 32
        ("cpu", args(), "runs on CUDA tensors only; hidden is on cpu"),
    ]


@needs_ext
@pytest.mark.parametrize("case", _bad_decode_calls(), ids=lambda c: c[0])
def test_decode_shim_checks_name_the_problem(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=message):
        torch.ops.moeq_C.fused_experts_decode(*args)


@needs_ext
@pytest.mark.parametrize("x, message", [
    (torch.randn(3, 72), "last dim n=72: n is not m \\* 2\\^k"),
    (torch.randn(3, 64, dtype=torch.float64), "x must be float32, float16 or bfloat16, got Double"),
    (torch.randn(3, 768), "runs on CUDA tensors only; x is on cpu"),
])
def test_hadamard_shim_checks(x, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.moeq_C.hadamard_transform(x, 1.0)


# ---------------------------------------------------------------------------------------------- CPU emulation
@pytest.fixture(scope="session")
def emu_harness(tmp_path_factory):
    """The kernel sources compiled for the CPU emulation (emu.h): the path of the harness binary."""
    if HAS_GPU:
        pytest.skip("a GPU is present: the compiled kernels are tested directly")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found (the CPU emulation of the CUDA kernels needs it)")
    out = tmp_path_factory.mktemp("cuda_emu")
    sources = [EMU / "harness.cpp"]
    for name in ("moe_decode.cu", "hadamard.cu"):
        src = (ROOT / "csrc" / name).read_text()
        # kernel<<<grid, block, smem, stream>>>(args) -> ::emu::launch(kernel, grid, block, smem, stream, args)
        src = re.sub(r"([\w:]+(?:<[^<>;]*>)?)<<<(.*?)>>>\(", r"::emu::launch(\1, \2, ", src)
        src = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = ::emu::shared_mem<\1>();", src)
        path = out / name.replace(".cu", "_emu.cpp")
        path.write_text(src)
        sources.append(path)
    flags = ["-std=c++20", "-O2", "-w", "-include", str(EMU / "emu.h"), "-I", str(EMU / "fakeinc"),
             "-I", str(ROOT / "csrc")]
    procs = [subprocess.Popen([gxx, *flags, "-c", str(s), "-o", str(out / (s.stem + ".o"))],
                              stderr=subprocess.PIPE, text=True) for s in sources]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    if any(p.returncode for p in procs):
        pytest.fail("emulation build failed:\n" + "\n".join(errors)[-4000:])
    exe = out / "harness"
    subprocess.run([gxx, *[str(out / (s.stem + ".o")) for s in sources], "-o", str(exe)], check=True, timeout=300)
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t).numpy().tobytes()


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    data = bytearray(path.read_bytes())
    if dtype in (torch.float16, torch.bfloat16):
        return torch.frombuffer(data, dtype=torch.int16).view(dtype).view(shape)
    return torch.frombuffer(data, dtype=dtype).view(shape)


@pytest.mark.parametrize("t, e, h, i, k, opts", EMU_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_emulated_decode_kernels_match_reference(emu_harness, tmp_path, t, e, h, i, k, opts):
    hadamard, opts = _split(opts)
    c = make_case(t, e, h, i, k, **opts)
    dtype, sdt = c["hidden"].dtype, c["w13"][1].dtype
    meta = [t, k, e, h, i, h if c["g13"] == -1 else c["g13"], i if c["g2"] == -1 else c["g2"], CODE[dtype], CODE[sdt],
            CODE[sdt], CODE[c["wts"].dtype], 0 if c["ids"].dtype == torch.int32 else 1, int(c["w13"][2] is not None),
            int(c["w2"][2] is not None), int(hadamard)]
    (tmp_path / "meta.txt").write_text(" ".join(map(str, meta)) + "\n")
    files = {"hidden": c["hidden"], "ids": c["ids"], "weights": c["wts"], "w13q": c["w13"][0], "w13s": c["w13"][1],
             "w13z": c["w13"][2], "w2q": c["w2"][0], "w2s": c["w2"][1], "w2z": c["w2"][2]}
    for name, tensor in files.items():
        if tensor is not None:
            (tmp_path / f"{name}.bin").write_bytes(_raw(tensor))
    run = subprocess.run([str(emu_harness), "moe", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stderr
    out = _read(tmp_path / "out.bin", dtype, (t, h))
    assert rel_err(out, reference(c, hadamard)) < TOL[dtype]


@pytest.mark.parametrize("n", HAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_hadamard_matches_reference(emu_harness, tmp_path, n, dtype):
    x = torch.randn(3, n).to(dtype)
    scale = 1 / math.sqrt(n)
    (tmp_path / "meta.txt").write_text(f"3 {n} {CODE[dtype]} {scale!r}\n")
    (tmp_path / "x.bin").write_bytes(_raw(x))
    run = subprocess.run([str(emu_harness), "hadamard", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stderr
    y = _read(tmp_path / "y.bin", dtype, (3, n))
    assert rel_err(y, hadamard_ref(x.float(), scale)) < TOL[dtype]


# ---------------------------------------------------------------------------------------------- GPU
def _poison_allocator(*shapes_dtypes):
    """Fill cached allocator blocks of these sizes with NaN and free them, so the op's own outputs and
    workspaces (allocated next, same sizes) start as NaN: an element the kernel misses stays NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def _cuda_call(c, hadamard):
    t, h = c["hidden"].shape
    k, i = c["ids"].shape[1], c["w2"][0].shape[-1] * 8
    _poison_allocator(((t, h), c["hidden"].dtype), ((t * k, i), torch.float32))
    return torch.ops.moeq_C.fused_experts_decode(c["hidden"], c["ids"], c["wts"], *c["w13"], *c["w2"], c["g13"],
                                                 c["g2"], hadamard)


@needs_ext
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("t, e, h, i, k, opts", MOE_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_decode_kernels_match_reference(t, e, h, i, k, opts):
    hadamard, opts = _split(opts)
    c = make_case(t, e, h, i, k, device="cuda", **opts)
    ref = reference(c, hadamard)
    out = _cuda_call(c, hadamard)
    assert out.shape == (t, h) and out.dtype == c["hidden"].dtype
    assert rel_err(out, ref) < TOL[out.dtype]
    # The public op picks this backend for decode sizes and gives the same result.
    public = ops.fused_experts(c["hidden"], c["ids"], c["wts"], *c["w13"], *c["w2"], 4, c["g13"], 4, c["g2"],
                               "silu", hadamard, backend="cuda")
    assert torch.equal(public, out)  # deterministic: same kernels, fixed reduction order


@needs_ext
@needs_gpu
@pytest.mark.gpu
def test_auto_dispatch_and_cuda_graph_replay():
    c = make_case(2, 16, 512, 768, 4, device="cuda")
    attrs = dict(DECODE_ATTRS, hidden_dim=512, intermediate_dim=768, num_tokens=2, online_hadamard=True)
    assert backends.backend_for("fused_experts", "cuda", **attrs) == "cuda"
    assert backends.backend_for("fused_experts", "cuda", **{**attrs, "num_tokens": 64}) != "cuda"

    def call():
        return torch.ops.moeq_C.fused_experts_decode(c["hidden"], c["ids"], c["wts"], *c["w13"], *c["w2"], 128, 128,
                                                     True)

    call()  # warm-up outside capture (cudaFuncSetAttribute, module load)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    fresh = make_case(2, 16, 512, 768, 4, device="cuda")
    for key in ("hidden", "ids", "wts"):
        c[key].copy_(fresh[key])
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(c, True)) < TOL[torch.bfloat16]


@needs_ext
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", HAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hadamard_op_matches_reference(n, dtype):
    x = torch.randn(2, 3, n, device="cuda").to(dtype)
    _poison_allocator(((2, 3, n), dtype))
    y = torch.ops.moeq_C.hadamard_transform(x, 1 / math.sqrt(n))
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, hadamard_ref(x.float().cpu())) < TOL[dtype]
    assert torch.equal(hadamard_transform(x, backend="cuda"), y)
    strided = torch.randn(n, 4, device="cuda").to(dtype).t()  # last dim not contiguous
    assert rel_err(torch.ops.moeq_C.hadamard_transform(strided, 0.5), hadamard_ref(strided.float().cpu(), 0.5)) < TOL[dtype]


@needs_ext
@needs_gpu
@pytest.mark.gpu
def test_opcheck():
    c = make_case(2, 4, 64, 96, 2, g13=32, g2=32, asym=True, device="cuda")
    torch.library.opcheck(
        torch.ops.moeq_C.fused_experts_decode.default,
        (c["hidden"], c["ids"], c["wts"], *c["w13"], *c["w2"], 32, 32, False),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(torch.ops.moeq_C.hadamard_transform.default,
                          (torch.randn(3, 768, device="cuda"), 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
