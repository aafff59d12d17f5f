"""GPU check and timing of moeq's Triton fused MoE experts (W4A16) against bf16 transformers experts.

Self-contained (puts the checkout on sys.path); on a CUDA GPU:

    python benchmarks/gpu_kernels_check.py             # ~5 minutes on an H100, compiles included
    python benchmarks/gpu_kernels_check.py --sweep     # + config sweep, writes suggested_triton_moe.json

1. Correctness of the compiled kernels (fresh random inputs; ||out - ref|| / ||ref|| against
   ``fused_experts_ref`` on fp32-upcast activations; fp16 < 3e-3, bf16 < 1.5e-2; NaN fails): both paths,
   bf16 and fp16, T=1, odd T, empty experts, top-k = E, sentinel ids, asymmetric zeros, groups
   32/64/128/per-channel, 8-bit, split-K, online Hadamard (separate pass, and fused into the slot-path down
   kernel); the four real shapes at T in {1, 7, 128, 2048};
   ``moe_align`` against its PyTorch twin; the Hadamard rotation against ``hadamard_ref``; CUDA-graph
   capture; ``torch.compile(fullgraph=True, mode="reduce-overhead")`` over ``torch.ops.moeq.fused_experts``.
2. Timing (median of CUDA-graph replays, ``do_bench_cudagraph``) on Mixtral-8x7B, Qwen3-30B-A3B,
   DeepSeek-V2-Lite, OLMoE at T in {1, 16, 128, 2048}: moeq (default configs) with and without online
   Hadamard (and, where the default is the slot path, with the Hadamard fused into the down kernel:
   the column that decides ``KernelConfig.hadamard``), transformers' bf16 ``grouped_mm`` experts (graph replays) and eager loop (``do_bench`` median).
   Each timed call cycles over 4 routing/input sets so small INT4 experts are not served from L2.
   Reported: us, GB/s of touched INT4 bytes, fraction of the floor (touched experts' INT4 weights + bf16
   g128 scales / 3.0 TB/s; at large T the compute floor 2*T*k*3*H*I / 738 TFLOP/s when larger),
   speed-up vs grouped_mm.
Results (JSON + markdown, GPU, versions, date) go to ``$OUT`` if set, else ``benchmarks/results/``; a compact
table is printed last. A failing case is recorded and the run goes on; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from moeq_kernels.experts import ExpertWeights  # noqa: E402
from moeq_kernels.packing import pack  # noqa: E402
from moeq_kernels.reference import fused_experts_ref, hadamard_ref  # noqa: E402
from moeq_kernels.triton.configs import GemmTile, KernelConfig, select_config, shape_key  # noqa: E402
from moeq_kernels.triton.moe_align import moe_align_torch, moe_align_triton  # noqa: E402
from moeq_kernels.triton.moe_gemm import fused_experts_triton  # noqa: E402
from moeq_kernels.triton.moe_hadamard import rotate_rows_  # noqa: E402

try:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
except ImportError:  # names moved: fall back to the base classes they derive from
    CompilationError = OutOfResources = RuntimeError


def triton_flat(x, idx, w, *flat, config=None):
    """``fused_experts_triton`` on this script's flat argument lists (``ExpertWeights.op_args`` order)."""
    return fused_experts_triton(x, idx, w, ExpertWeights.from_op_args(*flat), config=config)


def ref_flat(x, idx, w, *flat):
    """``fused_experts_ref`` on a flat argument list (as :func:`triton_flat`)."""
    return fused_experts_ref(x, idx, w, ExpertWeights.from_op_args(*flat))


logger = logging.getLogger("gpu_kernels_check")
DEV = "cuda"
SHAPES = {"Mixtral-8x7B": (8, 4096, 14336, 2), "Qwen3-30B-A3B": (128, 2048, 768, 8),
          "DeepSeek-V2-Lite": (64, 2048, 1408, 6), "OLMoE-1B-7B": (64, 2048, 1024, 8)}
TOKENS = (1, 16, 128, 2048)
HBM_BPS, TC_FLOPS = 3.0e12, 738e12  # measured ceilings of the ANCHORS H100
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
SETS = 4  # routing/input sets cycled per timed call
# What a failing case may raise: kernel compile/launch errors, shape errors, OOM (a RuntimeError).
FAILURES = (RuntimeError, ValueError, AssertionError, TypeError, IndexError, CompilationError, OutOfResources)
RESULTS: dict = {"checks": [], "bench": [], "sweep": []}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not bool(torch.isfinite(got).all()):
        return float("nan")
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def record_check(name: str, fn, *args, **kwargs) -> None:
    """Run one check ``fn(*args, **kwargs) -> (err, tol)``; record and log it, never raise."""
    t0 = time.perf_counter()
    try:
        err, tol = fn(*args, **kwargs)
        ok = err == err and err < tol
        row = dict(name=name, err=err, tol=tol, ok=ok)
    except FAILURES as exc:
        row = dict(name=name, err=None, tol=None, ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
    row["secs"] = round(time.perf_counter() - t0, 2)
    RESULTS["checks"].append(row)
    logger.info("%-58s %s %s", name, "ok  " if row["ok"] else "FAIL", row["error"] if "error" in row else f"{row['err']:.2e}")


# ---------------------------------------------------------------------------------------------- inputs
def small_stack(e, n, k, group, sym, bits, dtype):
    g = k if group == -1 else group
    q = torch.randint(0, 2**bits, (e, n, k), device=DEV)
    s = ((torch.rand(e, n, k // g, device=DEV) + 0.5) / (k**0.5 * 2 ** (bits - 1))).to(dtype)
    z = None if sym else torch.randint(0, 2**bits, (e, n, k // g), device=DEV, dtype=torch.uint8)
    return [pack(q, bits), s, z]


def big_stack(e, n, k, dtype, group=128):
    """Random packed INT4 stack drawn as words (packing codes of Mixtral's size would need 7 GB)."""
    qw = torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), dtype=torch.int32, device=DEV)
    s = ((torch.rand(e, n, k // group, device=DEV) + 0.5) / (k**0.5 * 8)).to(dtype)
    return [qw, s, None]


def routing(t, e, k, dtype=torch.bfloat16):
    """Softmax of Gaussian logits, top-k, renormalized (as in ANCHORS)."""
    probs = torch.softmax(torch.randn(t, e, device=DEV), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(dtype)


# ------------------------------------------------------------------------------------------- checks
SLOT = KernelConfig(path="slot", gate_up=GemmTile(block_n=32, block_k=128), down=GemmTile(block_n=16, block_k=256))
SLOT_FUSED = replace(SLOT, hadamard="fused")  # the Hadamard in the down kernel's prologue
GROUPED = KernelConfig(path="grouped", gate_up=GemmTile(block_m=16, block_n=64, block_k=128),
                       down=GemmTile(block_m=16, block_n=64, block_k=128))
PREFILL = KernelConfig(path="grouped", gate_up=GemmTile(block_m=64, block_n=128, block_k=64, num_warps=8),
                       down=GemmTile(block_m=64, block_n=128, block_k=64, split_k=2, num_warps=8))


def small_case(dtype, cfg, t=5, e=8, h=256, i=384, k=2, group=128, sym=True, bits=4, hadamard=False, idx=None):
    """One small-shape comparison with the reference; returns ``(err, tol)``. A given ``idx`` sets T."""
    t = t if idx is None else idx.shape[0]
    w13, w2 = small_stack(e, 2 * i, h, group, sym, bits, dtype), small_stack(e, h, i, group, sym, bits, dtype)
    x = torch.randn(t, h, device=DEV).to(dtype)
    if idx is None:
        idx = torch.stack([torch.randperm(e, device=DEV)[:k] for _ in range(t)])
    w = torch.rand(t, k, device=DEV)
    args = [x, idx.to(DEV), w, *w13, *w2, bits, group, bits, group, "silu", hadamard]
    got = triton_flat(*args, config=cfg)
    return rel_err(got, ref_flat(x.float(), *args[1:])), TOL[dtype]


def run_small_checks() -> None:
    sentinel = torch.tensor([[0, -1], [3, 1], [4, 2], [-1, 9], [1, 0]])
    cases = {
        "typical": dict(), "T=1": dict(t=1), "odd T=7, top-k=E, asym": dict(t=7, e=4, k=4, sym=False),
        "empty experts (E=64, T=3)": dict(t=3, e=64), "sentinel ids": dict(idx=sentinel),
        "group 32 asym": dict(group=32, sym=False), "group 64": dict(group=64),
        "per-channel (-1)": dict(group=-1, sym=False), "8-bit": dict(bits=8, sym=False),
        "hadamard I=384 (12*32)": dict(hadamard=True), "hadamard I=1408 (44*32)": dict(i=1408, hadamard=True),
    }
    for dtype in (torch.bfloat16, torch.float16):
        for cname, cfg in (("slot", SLOT), ("grouped", GROUPED), ("prefill-tiles split-K", PREFILL)):
            for name, kw in cases.items():
                kw = dict(kw, t=kw.get("t", 70 if cname.startswith("prefill") else 5))
                record_check(f"small {cname} {str(dtype)[6:]} {name}", small_case, dtype, cfg, **kw)
        fused_cases = {"I=384 (12*32)": dict(), "I=1408 (44*32) asym": dict(i=1408, sym=False),
                       "I=768 group 32": dict(i=768, group=32), "sentinel ids": dict(idx=sentinel)}
        for name, kw in fused_cases.items():
            record_check(f"small slot fused-Hadamard {str(dtype)[6:]} {name}", small_case, dtype, SLOT_FUSED,
                         hadamard=True, **kw)


def align_case(t, k, e, bm):
    idx = routing(t, e, k)[0]
    same = all(torch.equal(a, b) for a, b in zip(moe_align_triton(idx, e, bm), moe_align_torch(idx, e, bm)))
    return (0.0 if same else 1.0), 0.5


def rotation_case(n, dtype):
    x = torch.randn(64, n, device=DEV, dtype=dtype)
    return rel_err(rotate_rows_(x.clone(), exact_dots=False), hadamard_ref(x.float())), TOL[dtype] / 3


def run_align_checks() -> None:
    for t, k, e, bm in ((1, 2, 8, 16), (16, 8, 128, 16), (2048, 8, 128, 64), (2048, 2, 8, 128), (333, 6, 64, 32)):
        record_check(f"moe_align T={t} k={k} E={e} block_m={bm} == torch", align_case, t, k, e, bm)


def run_rotation_checks() -> None:
    for n in (768, 1024, 1408, 4096, 14336):
        for dtype in (torch.bfloat16, torch.float16):
            record_check(f"hadamard rotation n={n} {str(dtype)[6:]}", rotation_case, n, dtype)


def real_args(model, t, dtype, hadamard, stacks):
    e, h, i, k = SHAPES[model]
    idx, w = routing(t, e, k)
    x = torch.randn(t, h, device=DEV).to(dtype)
    return [x, idx, w, *stacks[0], *stacks[1], 4, 128, 4, 128, "silu", hadamard]


def fused_config(model, t) -> KernelConfig | None:
    """The default config of ``model`` at ``t`` tokens with the Hadamard fused into the down kernel, or None
    when that config is not on the slot path (the only path with a fused variant)."""
    cfg = select_config(*SHAPES[model], t)
    return replace(cfg, hadamard="fused") if cfg.path == "slot" else None


def real_case(model, t, hadamard, stacks, config=None):
    args = real_args(model, t, torch.bfloat16, hadamard, stacks)
    got = triton_flat(*args, config=config)
    return rel_err(got, ref_flat(args[0].float(), *args[1:])), TOL[torch.bfloat16]


def run_real_checks(model, stacks) -> None:
    for t in (1, 7, 128, 2048):
        for hadamard in (False, True):
            path = select_config(*SHAPES[model], t).path
            record_check(f"{model} T={t} {path} hadamard={hadamard}", real_case, model, t, hadamard, stacks)
        fused = fused_config(model, t)
        if fused is not None:
            record_check(f"{model} T={t} slot fused-Hadamard", real_case, model, t, True, stacks, config=fused)


def graph_case(model, t, stacks, config=None):
    args = real_args(model, t, torch.bfloat16, True, stacks)
    triton_flat(*args, config=config)  # warm-up: compiles, fills the Hadamard factor cache
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = triton_flat(*args, config=config)
    args[0].copy_(torch.randn_like(args[0]))  # new input in place: the replay must follow it
    g.replay()
    torch.cuda.synchronize()
    return rel_err(out, triton_flat(*args, config=config)), 1e-6


def run_graph_checks(model, stacks) -> None:
    for t in (1, 16, 300):
        record_check(f"{model} CUDA graph capture + replay T={t}", graph_case, model, t, stacks)
    fused = fused_config(model, 1)
    if fused is not None:
        record_check(f"{model} CUDA graph capture + replay T=1 fused-Hadamard", graph_case, model, 1, stacks,
                     config=fused)

    class Layer(torch.nn.Module):
        def forward(self, x, idx, w):
            # name the backend: with "auto" the CUDA decode kernel would run, compared against Triton's eager output
            return torch.ops.moeq.fused_experts(x, idx, w, *stacks[0], *stacks[1], 4, 128, 4, 128, "silu", True,
                                                "triton")

    def compiled_check():
        args = real_args(model, 4, torch.bfloat16, True, stacks)
        fn = torch.compile(Layer(), fullgraph=True, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):  # warm-up, record, replay
                out = fn(*args[:3]).clone()
        return rel_err(out, triton_flat(*args)), 1e-6
    record_check(f"{model} torch.compile(fullgraph, reduce-overhead) over the op", compiled_check)


# ------------------------------------------------------------------------------------------- timing
def bench_graph(fn, rep_ms: int = 60) -> float:
    """Median microseconds of ``fn`` over CUDA-graph replays."""
    try:
        return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3
    except TypeError:  # an older signature without return_mode
        return do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5]) * 1e3


def bench_eager(fn, rep_ms: int = 100) -> float:
    """Median microseconds of ``fn`` without graphs (the eager loop syncs on the host: not capturable)."""
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def bf16_experts(model):
    """transformers' own experts module (MixtralExperts: the same [E, 2I, H] / [E, H, I] layout as every
    v5 fused-experts class), bf16 random weights, switchable between grouped_mm and eager."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    e, h, i, k = SHAPES[model]
    cfg = MixtralConfig(num_local_experts=e, hidden_size=h, intermediate_size=i, num_experts_per_tok=k,
                        hidden_act="silu")
    with torch.device(DEV):
        mod = MixtralExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, h**-0.5)
        mod.down_proj.normal_(0, i**-0.5)
    return mod


def floors_us(model, touched: float, t: int) -> tuple[float, float, float]:
    """(INT4 bytes of touched experts, memory floor us, compute floor us)."""
    e, h, i, k = SHAPES[model]
    per_expert = 3 * h * i // 2 + (2 * i * (h // 128) + h * (i // 128)) * 2  # 4-bit weights + bf16 g128 scales
    nbytes = touched * per_expert
    return nbytes, nbytes / HBM_BPS * 1e6, 2 * t * k * 3 * h * i / TC_FLOPS * 1e6


def bench_shape(model, stacks, tokens, skip_eager: bool) -> None:
    e, h, i, k = SHAPES[model]
    ref_mod = bf16_experts(model)
    for t in tokens:
        sets = [real_args(model, t, torch.bfloat16, False, stacks) for _ in range(SETS)]
        touched = sum(len(torch.unique(s[1])) for s in sets) / SETS
        nbytes, mem_us, flop_us = floors_us(model, touched, t)
        floor = max(mem_us, flop_us)
        row = dict(model=model, T=t, touched=touched, int4_mb=nbytes / 1e6, floor_us=floor, mem_floor_us=mem_us,
                   compute_floor_us=flop_us, config=select_config(e, h, i, k, t).to_dict())
        for hadamard in (False, True):
            key = "moeq_had_us" if hadamard else "moeq_us"
            try:
                def moeq(sets=sets, hadamard=hadamard):
                    for s in sets:
                        triton_flat(*s[:-1], hadamard)
                row[key] = bench_graph(moeq) / SETS
            except FAILURES as exc:
                row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
        fused = fused_config(model, t)
        if fused is not None:  # the same layer with the Hadamard in the down kernel's prologue
            try:
                def moeq_fused(sets=sets, fused=fused):
                    for s in sets:
                        triton_flat(*s[:-1], True, config=fused)
                row["moeq_had_fused_us"] = bench_graph(moeq_fused) / SETS
            except FAILURES as exc:
                row["moeq_had_fused_us_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for impl, key, timer in (("grouped_mm", "grouped_mm_us", bench_graph), ("eager", "eager_us", bench_eager)):
            if impl == "eager" and skip_eager:
                continue
            ref_mod.config._experts_implementation = impl
            try:
                def base(sets=sets):
                    with torch.no_grad():
                        for s in sets:
                            ref_mod(s[0], s[1], s[2])
                row[key] = timer(base) / SETS
            except FAILURES as exc:
                row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if "moeq_us" in row:
            row["gbps"] = nbytes / (row["moeq_us"] * 1e-6) / 1e9
            row["frac_floor"] = floor / row["moeq_us"]
            if "grouped_mm_us" in row:
                row["speedup_vs_grouped_mm"] = row["grouped_mm_us"] / row["moeq_us"]
        RESULTS["bench"].append(row)
        logger.info("%s T=%d: %s", model, t, {a: round(b, 1) for a, b in row.items() if isinstance(b, float)})
    torch.cuda.empty_cache()


def sweep_candidates(model, t) -> list[KernelConfig]:
    """A few configs around the defaults (every one unmeasured until this runs)."""
    e, h, i, k = SHAPES[model]
    out = [select_config(e, h, i, k, t)]
    if t * k <= e:
        # (gate_up BLOCK_N, BLOCK_K, down BLOCK_N, BLOCK_K, warps): the 2-D GEMV accumulators hold
        # BLOCK_N * BLOCK_K fp32, so larger tiles get more warps.
        for (bn1, bk1, bn2, bk2, warps) in ((32, 128, 8, 512, 4), (16, 512, 16, 512, 8), (8, 512, 32, 256, 8),
                                            (16, 256, 8, 256, 2), (16, 256, 16, 256, 4)):
            out.append(KernelConfig(path="slot", gate_up=GemmTile(block_n=bn1, block_k=bk1, num_warps=warps),
                                    down=GemmTile(block_n=bn2, block_k=bk2, num_warps=warps)))
    # (32, 64, 64, 4, ...) and (128, 64, 64, 8, ...) are the spill-free neighbours of the defaults whose ptxas
    # stack is non-zero for sm_90 (benchmarks/results/triton_sm90_resources.md).
    for bm, bn, bk, warps, stages, split in ((16, 64, 128, 4, 3, 1), (16, 64, 128, 4, 4, 2), (32, 64, 128, 4, 3, 1),
                                             (32, 64, 64, 4, 3, 1),
                                             (64, 128, 64, 8, 3, 1), (128, 64, 64, 8, 3, 1), (64, 64, 128, 4, 4, 1),
                                             (128, 128, 64, 8, 4, 1)):
        if t * k >= bm * e // 4:  # skip blocks far larger than the slots per expert
            out.append(KernelConfig(path="grouped",
                                    gate_up=GemmTile(block_m=bm, block_n=bn if bm < 128 else 64, block_k=bk,
                                                     num_warps=warps, num_stages=stages),
                                    down=GemmTile(block_m=bm, block_n=bn, block_k=bk, split_k=split,
                                                  num_warps=warps, num_stages=stages)))
    return list(dict.fromkeys(out))


def time_candidate(model, t, cfg: KernelConfig, sets, ref, hadamard: bool) -> float | None:
    """Check ``cfg`` against ``ref`` on the first set, then its median us per call over ``sets`` (recorded in
    ``RESULTS["sweep"]``); None when it fails or is wrong (recorded with the error)."""
    rec = dict(model=model, T=t, hadamard=hadamard, config=cfg.to_dict())
    try:
        err = rel_err(triton_flat(*sets[0], config=cfg), ref)
        if not err < TOL[torch.bfloat16]:
            raise AssertionError(f"wrong result, relative error {err:.2e}")

        def run():
            for s in sets:
                triton_flat(*s, config=cfg)
        rec["us"] = bench_graph(run, rep_ms=40) / SETS
    except FAILURES as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
    RESULTS["sweep"].append(rec)
    return rec.get("us")


def sweep_shape(model, stacks, tokens, deadline: float) -> dict:
    """Time each candidate config; returns ``{bucket: best config dict}`` for the JSON table."""
    best = {}
    for t in tokens:
        sets = [real_args(model, t, torch.bfloat16, False, stacks) for _ in range(SETS)]
        ref = ref_flat(sets[0][0].float(), *sets[0][1:])
        timings = []
        for cfg in sweep_candidates(model, t):
            if time.perf_counter() > deadline:
                logger.warning("sweep deadline reached; %s T=%d not finished", model, t)
                break
            us = time_candidate(model, t, cfg, sets, ref, hadamard=False)
            if us is not None:
                timings.append((us, cfg))
        if timings:
            us, cfg = min(timings, key=lambda x: x[0])
            if cfg.path == "slot" and time.perf_counter() < deadline:
                cfg = sweep_hadamard_mode(model, t, cfg, stacks)
            best[str(t)] = cfg.to_dict()
            logger.info("sweep %s T=%d: best %.1f us (default %.1f us)", model, t, us, timings[0][0])
    return best


def sweep_hadamard_mode(model, t, cfg: KernelConfig, stacks) -> KernelConfig:
    """``cfg`` with the faster online-Hadamard placement on this shape (timed with the Hadamard on): the
    separate pass, or the fused down kernel at a few ``hadamard_block_n``."""
    sets = [real_args(model, t, torch.bfloat16, True, stacks) for _ in range(SETS)]
    ref = ref_flat(sets[0][0].float(), *sets[0][1:])
    cands = [replace(cfg, hadamard="pass")] + [replace(cfg, hadamard="fused", hadamard_block_n=b) for b in (4, 8, 16)]
    timings = [(us, c) for c in cands if (us := time_candidate(model, t, c, sets, ref, hadamard=True)) is not None]
    if not timings:
        return cfg
    us, pick = min(timings, key=lambda x: x[0])
    logger.info("sweep %s T=%d with Hadamard: %s, %.1f us", model, t, pick.hadamard, us)
    return pick


# ------------------------------------------------------------------------------------------- report
def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown() -> str:
    lines = ["| shape | T | touched | floor us | moeq us | +Had us | +Had fused us | GB/s | % floor | grouped_mm us "
             "| eager us | x vs grouped_mm | path |", "|" + "---|" * 13]
    for r in RESULTS["bench"]:
        lines.append(f"| {r['model']} | {r['T']} | {r['touched']:.1f} | {fmt(r['floor_us'])} | "
                     f"{fmt(r.get('moeq_us'))} | {fmt(r.get('moeq_had_us'))} | {fmt(r.get('moeq_had_fused_us'))} | "
                     f"{fmt(r.get('gbps'), '.0f')} | "
                     f"{fmt(100 * r['frac_floor'] if 'frac_floor' in r else None, '.0f')} | "
                     f"{fmt(r.get('grouped_mm_us'))} | {fmt(r.get('eager_us'))} | "
                     f"{fmt(r.get('speedup_vs_grouped_mm'), '.2f')} | {r['config']['path']} |")
    failed = [c for c in RESULTS["checks"] if not c["ok"]]
    lines += ["", f"checks: {len(RESULTS['checks']) - len(failed)}/{len(RESULTS['checks'])} passed"]
    lines += [f"- FAIL {c['name']}: {c.get('error') or c['err']}" for c in failed]
    errors = [(r["model"], r["T"], a, b) for r in RESULTS["bench"] for a, b in r.items() if a.endswith("_error")]
    lines += [f"- bench error {m} T={t} {a}: {b}" for m, t, a, b in errors]
    return "\n".join(lines)


def environment() -> dict:
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), python=sys.version.split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--skip-checks", action="store_true", help="timing only")
    parser.add_argument("--skip-eager", action="store_true", help="no eager-loop baseline (slow for E=128)")
    parser.add_argument("--sweep", action="store_true", help="time candidate configs, write the best as JSON")
    parser.add_argument("--sweep-tokens", nargs="*", type=int, default=[1, 16, 128, 2048])
    parser.add_argument("--budget-s", type=float, default=420.0, help="sweep stops past this wall time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not torch.cuda.is_available():
        logger.error("needs a CUDA GPU")
        return 2
    start = time.perf_counter()
    RESULTS["env"] = environment()
    torch.manual_seed(0)
    if not args.skip_checks:
        run_small_checks()
        run_align_checks()
        run_rotation_checks()
    table = {}
    for model in args.models:
        e, h, i, k = SHAPES[model]
        stacks = (big_stack(e, 2 * i, h, torch.bfloat16), big_stack(e, h, i, torch.bfloat16))
        if not args.skip_checks:
            run_real_checks(model, stacks)
            if model == "Qwen3-30B-A3B":
                run_graph_checks(model, stacks)
        bench_shape(model, stacks, args.tokens, args.skip_eager)
        if args.sweep:
            best = sweep_shape(model, stacks, args.sweep_tokens, start + args.budget_s)
            if best:
                table[shape_key(e, h, i, k)] = best
        del stacks
        torch.cuda.empty_cache()
    out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS["wall_s"] = round(time.perf_counter() - start, 1)
    (out_dir / f"gpu_kernels_check-{stamp}.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    md = markdown()
    header = f"# moeq Triton MoE kernels, {RESULTS['env']}\n\n"
    (out_dir / f"gpu_kernels_check-{stamp}.md").write_text(header + md + "\n")
    if table:
        (out_dir / "suggested_triton_moe.json").write_text(json.dumps({"version": 1, "entries": table}, indent=1))
    print(header + md)
    return 0 if all(c["ok"] for c in RESULTS["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
