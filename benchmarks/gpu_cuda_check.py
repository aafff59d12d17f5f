"""GPU check and timing of moeq's CUDA decode MoE kernels (``csrc/moe_decode.cu``) and Hadamard op.

Builds nothing: run it after ``pip install --no-build-isolation -e .`` on a CUDA machine::

    python benchmarks/gpu_cuda_check.py            # ~3-5 minutes on an H100

1. Correctness (fresh random inputs; ||out - ref|| / ||ref|| against ``fused_experts_ref`` on fp32-upcast
   activations, bf16 < 1e-2, NaN fails): the CUDA decode op on Mixtral-8x7B (8/4096/14336/2),
   Qwen3-30B-A3B (128/2048/768/8), DeepSeek-V2-Lite (64/2048/1408/6), OLMoE-1B-7B (64/2048/1024/8) at
   T in {1, 16}, bf16, with and without online Hadamard; ``moeq_C::hadamard_transform`` against
   ``hadamard_ref`` at n in {768, 1024, 1408, 14336}; a CUDA-graph replay against the eager call.
2. Timing: median of CUDA-graph replays (one graph holds one call per input set, 4 sets rotated, so small
   experts are not served from L2; ``triton.testing.do_bench`` flushes L2 between replays, CUDA events
   when Triton is absent): moeq CUDA (with / without Hadamard), the Triton backend
   (``torch.ops.moeq.fused_experts(..., backend="triton")``), a bf16 baseline with ``grouped_mm`` (graphed)
   and the bf16 per-expert eager loop (events, not capturable). Reported: us, GB/s and fraction of the INT4
   floor (touched experts' 4-bit weights + bf16 g128 scales / 3.0 TB/s, ANCHORS), speed-up vs bf16.
   Also the standalone Hadamard op at 16 rows.
Results (JSON + markdown, GPU, versions, commit, date) go to ``$OUT`` if set, else ``benchmarks/results/``;
a compact table is printed last. A failing case prints its error and the run goes on; exit status 1 if
any check failed.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

import moeq_kernels  # noqa: F401  (registers the ops and backends)
from moeq_kernels import _cuda
from benchmarks import bench_common as bc  # noqa: E402
from moeq_kernels.experts import ExpertWeights  # noqa: E402
from moeq_kernels.reference import fused_experts_ref, hadamard_ref

try:
    import triton
    from triton.testing import do_bench
except ImportError:
    triton = do_bench = None

logger = logging.getLogger("gpu_cuda_check")
DEV = "cuda"
SHAPES = {"Mixtral-8x7B": (8, 4096, 14336, 2), "Qwen3-30B-A3B": (128, 2048, 768, 8),
          "DeepSeek-V2-Lite": (64, 2048, 1408, 6), "OLMoE-1B-7B": (64, 2048, 1024, 8)}
TOKENS = (1, 16)
HBM_BPS = 3.0e12  # measured device-to-device copy of the ANCHORS H100
TOL = 1e-2       # bf16
SETS = 4
FAILURES = (RuntimeError, ValueError, AssertionError, TypeError, IndexError, NotImplementedError)
RESULTS: dict = {"checks": [], "bench": [], "hadamard": []}


# ---------------------------------------------------------------------------------------------- inputs
def big_stack(e, n, k, group=128):
    """Random packed INT4 stack drawn as words (packing Mixtral-size codes would need 7 GB), bf16 scales."""
    qw = torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), dtype=torch.int32, device=DEV)
    s = ((torch.rand(e, n, k // group, device=DEV) + 0.5) / (k**0.5 * 8)).to(torch.bfloat16)
    return [qw, s, None]


def routing(t, e, k):
    """Softmax of Gaussian logits, top-k, renormalized (as in ANCHORS)."""
    probs = torch.softmax(torch.randn(t, e, device=DEV), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def input_set(model, t):
    e, h, _, k = SHAPES[model]
    idx, w = routing(t, e, k)
    return torch.randn(t, h, device=DEV).to(torch.bfloat16), idx, w


def rel_err(got, ref) -> float:
    if not bool(torch.isfinite(got).all()):
        return float("nan")
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def record_check(name, fn) -> None:
    t0 = time.perf_counter()
    try:
        err = fn()
        row = dict(name=name, err=err, ok=not math.isnan(err) and err < TOL)
    except FAILURES as exc:
        row = dict(name=name, err=None, ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
    row["secs"] = round(time.perf_counter() - t0, 2)
    RESULTS["checks"].append(row)
    print(f"{name:60s} {'ok  ' if row['ok'] else 'FAIL'} {row.get('error') or format(row['err'], '.2e')}", flush=True)


def cuda_call(stacks, x, idx, w, hadamard):
    return torch.ops.moeq_C.fused_experts_decode(x, idx, w, *stacks[0], *stacks[1], 128, 128, hadamard)


# ---------------------------------------------------------------------------------------------- checks
def run_checks(model, stacks) -> None:
    for t in TOKENS:
        for hadamard in (False, True):
            def check(t=t, hadamard=hadamard):
                x, idx, w = input_set(model, t)
                out = cuda_call(stacks, x, idx, w, hadamard)
                weights = ExpertWeights.from_op_args(*stacks[0], *stacks[1], 4, 128, 4, 128, "silu", hadamard)
                ref = fused_experts_ref(x.float(), idx, w.float(), weights)
                return rel_err(out, ref)
            record_check(f"{model} T={t} hadamard={hadamard} vs reference", check)

    def graph_check():
        x, idx, w = input_set(model, 1)
        cuda_call(stacks, x, idx, w, True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = cuda_call(stacks, x, idx, w, True)
        x2, idx2, w2 = input_set(model, 1)
        for dst, src in ((x, x2), (idx, idx2), (w, w2)):
            dst.copy_(src)
        g.replay()
        torch.cuda.synchronize()
        return rel_err(out, cuda_call(stacks, x, idx, w, True))
    record_check(f"{model} CUDA graph replay == eager call", graph_check)


def run_hadamard_checks() -> None:
    for n in (768, 1024, 1408, 14336):
        def check(n=n):
            x = torch.randn(16, n, device=DEV).to(torch.bfloat16)
            return rel_err(torch.ops.moeq_C.hadamard_transform(x, 1 / math.sqrt(n)), hadamard_ref(x.float()))
        record_check(f"hadamard_transform n={n} bf16 vs reference", check)


# ---------------------------------------------------------------------------------------------- timing
def graph_us(calls, rep_ms=100) -> float:
    """Median microseconds per call: one CUDA graph runs every call of ``calls`` (one per input set)."""
    for c in calls:  # warm-up outside capture: Triton compiles, cudaFuncSetAttribute, lazy module load
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    if do_bench is not None:
        ms = do_bench(g.replay, warmup=25, rep=rep_ms, return_mode="median")
    else:
        ms = bc.median_event_ms(g.replay, 50)
    return ms * 1e3 / len(calls)



def grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def bf16_grouped(x, idx, w, w13, w2):
    """bf16 experts via grouped_mm: routing sort, gate_up, SiLU*up, down, weighted scatter (fixed shapes)."""
    gmm = grouped_mm_fn()
    t, k = idx.shape
    i = w2.shape[-1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=w13.shape[0]), 0).to(torch.int32)
    gu = gmm(x[tok], w13.transpose(1, 2), offs=offs)
    y = gmm(F.silu(gu[:, :i]) * gu[:, i:], w2.transpose(1, 2), offs=offs)
    y = y.float() * w.reshape(-1)[order].float().unsqueeze(-1)
    return torch.zeros(t, x.shape[1], device=x.device, dtype=torch.float32).index_add_(0, tok, y).to(x.dtype)


def bf16_eager(x, idx, w, w13, w2):
    """The per-expert Python loop (transformers' default experts): host sync per call."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    i = w2.shape[-1]
    flat = idx.reshape(-1)
    for e in torch.unique(flat).tolist():
        slots = (flat == e).nonzero().squeeze(-1)
        tok = slots // idx.shape[1]
        gu = x[tok] @ w13[e].t()
        y = (F.silu(gu[:, :i]) * gu[:, i:]) @ w2[e].t()
        out.index_add_(0, tok, y.float() * w.reshape(-1)[slots].float().unsqueeze(-1))
    return out.to(x.dtype)


def touched_bytes(model, sets) -> tuple[float, float]:
    _, h, i, _ = SHAPES[model]
    touched = sum(len(torch.unique(s[1])) for s in sets) / len(sets)
    per_expert = 3 * h * i // 2 + (2 * i * (h // 128) + h * (i // 128)) * 2  # INT4 + bf16 g128 scales
    return touched, touched * per_expert


def timed(row, key, fn) -> None:
    try:
        row[key] = fn()
    except FAILURES as exc:
        row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"  {row['model']} T={row['T']} {key}: {row[key + '_error']}", flush=True)


def bench_model(model, stacks, bf16_w) -> None:
    for t in TOKENS:
        sets = [input_set(model, t) for _ in range(SETS)]
        touched, nbytes = touched_bytes(model, sets)
        floor_us = nbytes / HBM_BPS * 1e6
        row = dict(model=model, T=t, touched=touched, int4_mb=nbytes / 1e6, floor_us=floor_us)
        for had in (False, True):
            suffix = "_had" if had else ""
            timed(row, "cuda_us" + suffix, lambda had=had, sets=sets: graph_us(
                [lambda s=s: cuda_call(stacks, *s, had) for s in sets]))
            timed(row, "triton_us" + suffix, lambda had=had, sets=sets: graph_us([
                lambda s=s: torch.ops.moeq.fused_experts(*s, *stacks[0], *stacks[1], 4, 128, 4, 128, "silu", had,
                                                         backend="triton") for s in sets]))
        if grouped_mm_fn() is not None:
            timed(row, "bf16_grouped_mm_us", lambda sets=sets: graph_us(
                [lambda s=s: bf16_grouped(*s, *bf16_w) for s in sets]))
        timed(row, "bf16_eager_us", lambda sets=sets: 1e3 * statistics.median(
            bc.median_event_ms(lambda s=s: bf16_eager(*s, *bf16_w), 5) for s in sets))
        if "cuda_us" in row:
            row["gbps"] = nbytes / (row["cuda_us"] * 1e-6) / 1e9
            row["frac_floor"] = floor_us / row["cuda_us"]
            for base in ("bf16_grouped_mm_us", "bf16_eager_us", "triton_us"):
                if base in row:
                    row["x_vs_" + base[:-3]] = row[base] / row["cuda_us"]
        if "cuda_us_had" in row and "cuda_us" in row:
            row["hadamard_extra_pct"] = 100 * (row["cuda_us_had"] / row["cuda_us"] - 1)
        RESULTS["bench"].append(row)
        print(f"  {model} T={t}: " + ", ".join(f"{a}={b:.1f}" for a, b in row.items() if isinstance(b, float)),
              flush=True)


def bench_hadamard() -> None:
    for n in (768, 1024, 1408, 14336):
        x = [torch.randn(16, n, device=DEV).to(torch.bfloat16) for _ in range(SETS)]
        row = dict(n=n, rows=16)
        try:
            row["cuda_us"] = graph_us([lambda v=v, n=n: torch.ops.moeq_C.hadamard_transform(v, 1 / math.sqrt(n))
                                       for v in x])
        except FAILURES as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        RESULTS["hadamard"].append(row)


# ---------------------------------------------------------------------------------------------- report
def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown() -> str:
    header = ("| shape | T | touched | floor us | cuda us | +Had us | Had % | GB/s | % floor | triton us | +Had | "
              "bf16 grouped_mm us | bf16 eager us | x grouped_mm |")
    lines = [header, "|" + "---|" * 14]
    for r in RESULTS["bench"]:
        lines.append(
            f"| {r['model']} | {r['T']} | {r['touched']:.1f} | {fmt(r['floor_us'])} | {fmt(r.get('cuda_us'))} | "
            f"{fmt(r.get('cuda_us_had'))} | {fmt(r.get('hadamard_extra_pct'), '.0f')} | {fmt(r.get('gbps'), '.0f')} | "
            f"{fmt(100 * r['frac_floor'] if 'frac_floor' in r else None, '.0f')} | {fmt(r.get('triton_us'))} | "
            f"{fmt(r.get('triton_us_had'))} | {fmt(r.get('bf16_grouped_mm_us'))} | {fmt(r.get('bf16_eager_us'))} | "
            f"{fmt(r.get('x_vs_bf16_grouped_mm'), '.2f')} |")
    lines += ["", "Hadamard op, 16 rows bf16: " + ", ".join(
        f"n={r['n']}: {fmt(r.get('cuda_us'))} us" for r in RESULTS["hadamard"])]
    failed = [c for c in RESULTS["checks"] if not c["ok"]]
    lines += ["", f"checks: {len(RESULTS['checks']) - len(failed)}/{len(RESULTS['checks'])} passed"]
    lines += [f"- FAIL {c['name']}: {c.get('error') or c['err']}" for c in failed]
    lines += [f"- bench error {r['model']} T={r['T']} {a}: {b}" for r in RESULTS["bench"] for a, b in r.items()
              if a.endswith("_error")]
    return "\n".join(lines)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=getattr(triton, "__version__", None), commit=commit, python=sys.version.split()[0],
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    if not (_cuda.load() and hasattr(torch.ops.moeq_C, "fused_experts_decode")):
        print("moeq_kernels._C with fused_experts_decode is not built: pip install --no-build-isolation -e .")
        return 2
    start = time.perf_counter()
    RESULTS["env"] = environment()
    torch.manual_seed(0)
    run_hadamard_checks()
    for model, (e, h, i, _) in SHAPES.items():
        stacks = (big_stack(e, 2 * i, h), big_stack(e, h, i))
        run_checks(model, stacks)
        with torch.device(DEV):  # bf16 weights of the same shapes for the baselines
            bf16_w = (torch.randn(e, 2 * i, h, dtype=torch.bfloat16) * h**-0.5,
                      torch.randn(e, h, i, dtype=torch.bfloat16) * i**-0.5)
        bench_model(model, stacks, bf16_w)
        del stacks, bf16_w
        torch.cuda.empty_cache()
    bench_hadamard()
    RESULTS["wall_s"] = round(time.perf_counter() - start, 1)
    out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out_dir / f"gpu_cuda_check-{stamp}.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    md = markdown()
    (out_dir / f"gpu_cuda_check-{stamp}.md").write_text(f"# moeq CUDA decode MoE kernels, {RESULTS['env']}\n\n{md}\n")
    print(f"\n{RESULTS['env']}  wall {RESULTS['wall_s']} s\n{md}")
    return 0 if all(c["ok"] for c in RESULTS["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
