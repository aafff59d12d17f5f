"""GPU check and timing of moeq's W4A8 Triton path (moe_w4a8) against W4A16 and bf16 transformers experts.

Prepared without a GPU (written 2026-12, not yet run): nothing here has been timed. On a CUDA GPU, one command:

    python benchmarks/gpu_w4a8_check.py                      # checks + T=2048 on Mixtral-8x7B and Qwen3-30B-A3B
    python benchmarks/gpu_w4a8_check.py --tokens 16 128 2048 --models Mixtral-8x7B Qwen3-30B-A3B DeepSeek-V2-Lite

1. Correctness of the compiled kernels (fresh random inputs, NaN fails):
   * ``quantize_rows`` bit-exact to ``act_quant.quantize_act`` (int8 and e4m3; [2048, 4096] bf16);
   * ``rotate_quantize_rows`` codes vs ``quantize_act(hadamard_ref(h))`` (fraction of codes one step apart);
   * the whole layer vs ``reference.w4a8.w4a8_pipeline_f64`` (the same pipeline in float64) and vs the
     reference backend, small shapes and the real shapes at T=2048, both formats, Hadamard on; this is where
     the sm_90 e4m3 tensor-core accumulator (fewer bits than fp32, flushed every BLOCK_K products) shows;
   * CUDA-graph capture + replay of the W4A8 path.
2. Timing (median of CUDA-graph replays, ``do_bench_cudagraph``; each timed call cycles over 4 routing/input
   sets): per shape and T, moeq W4A16 (the existing grouped path), moeq W4A8-int8 and W4A8-fp8 (with and
   without the online Hadamard), the activation quantize kernel alone, and transformers' bf16 ``grouped_mm``
   experts. Reported: us, speed-up vs grouped_mm (issue #16's target at T=2048: >= 1.3x on Mixtral-8x7B and
   Qwen3-30B-A3B), the compute floor at bf16 / 8-bit tensor-core rates.
Results (JSON + markdown, GPU, versions, date) go to ``$OUT`` if set, else ``benchmarks/results/``.
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_kernels_check as gkc  # noqa: E402  (shared inputs, timers, bf16 baseline)

from moeq_kernels.act_quant import ActSpec, quantize_act  # noqa: E402
from moeq_kernels.experts import ExpertWeights  # noqa: E402
from moeq_kernels.packing import PackedWeight  # noqa: E402
from moeq_kernels.reference import fused_experts_ref, hadamard_ref  # noqa: E402
from moeq_kernels.reference.w4a8 import w4a8_pipeline_f64  # noqa: E402
from moeq_kernels.triton.moe_act_quant import quantize_rows, rotate_quantize_rows  # noqa: E402
from moeq_kernels.triton.moe_gemm import fused_experts_triton  # noqa: E402

logger = logging.getLogger("gpu_w4a8_check")
DEV = "cuda"
FORMATS = ("int", "fp8_e4m3")
DEFAULT_MODELS = ("Mixtral-8x7B", "Qwen3-30B-A3B")
# vs the float64 pipeline: the interpreter is bit-identical in fp16; on a GPU the fp32 sums run in another order
# and the e4m3 accumulator keeps fewer bits, so a few outputs round apart and some down-input codes move a step.
PIPE_TOL = {torch.float16: 3e-3, torch.bfloat16: 8e-3}
REF_TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2}  # the reference rounds its dequantized activations
TC_DENSE = {"bf16": 989e12, "8bit": 1979e12}  # H100 SXM datasheet dense tensor-core peaks (FLOP/s), for floors
RESULTS: dict = {"checks": gkc.RESULTS["checks"], "bench": []}


def w4a8(w13: PackedWeight, w2: PackedWeight, fmt: str, hadamard: bool) -> ExpertWeights:
    return ExpertWeights(w13, w2, "silu", hadamard, ActSpec(8, fmt), ActSpec(8, fmt))


def stacks_of(model, dtype=torch.bfloat16):
    e, h, i, k = gkc.SHAPES[model]
    return (PackedWeight(*gkc.big_stack(e, 2 * i, h, dtype), 4, 128),
            PackedWeight(*gkc.big_stack(e, h, i, dtype), 4, 128))


# ------------------------------------------------------------------------------------------- checks
def quantize_case(fmt, dtype):
    x = (torch.randn(2048, 4096, device=DEV) * torch.logspace(-2, 2, 2048, device=DEV)[:, None]).to(dtype)
    spec = ActSpec(8, fmt, 0.9)
    codes, scales = quantize_rows(x, spec)
    want, want_s = quantize_act(x, spec)
    exact = torch.equal(codes.view(torch.uint8), want.view(torch.uint8)) and torch.equal(scales, want_s[:, 0])
    return (0.0 if exact else 1.0), 0.5


def rotate_case(fmt, n):
    h = torch.randn(512, n, device=DEV).to(torch.bfloat16)
    spec = ActSpec(8, fmt)
    codes, scales = rotate_quantize_rows(h, spec, exact_dots=False)
    want, _ = quantize_act(hadamard_ref(h), spec)
    return (codes.float() != want.float()).double().mean().item(), 0.02


def layer_case(fmt, dtype, model=None, t=33, hadamard=True, oracle="pipeline"):
    """Whole layer vs ``w4a8_pipeline_f64`` (``oracle="pipeline"``) or the reference backend; ``(err, tol)``."""
    if model is None:  # small shape, g128 stacks with asymmetric zeros
        e, h, i, k = 8, 256, 384, 2
        w13 = PackedWeight(*gkc.small_stack(e, 2 * i, h, 128, False, 4, dtype), 4, 128)
        w2 = PackedWeight(*gkc.small_stack(e, h, i, 128, False, 4, dtype), 4, 128)
    else:
        e, h, i, k = gkc.SHAPES[model]
        w13, w2 = stacks_of(model, dtype)
    weights = w4a8(w13, w2, fmt, hadamard)
    idx, wts = gkc.routing(t, e, k)
    x = torch.randn(t, h, device=DEV).to(dtype)
    got = fused_experts_triton(x, idx, wts, weights)
    if oracle == "pipeline":
        return gkc.rel_err(got, w4a8_pipeline_f64(x, idx, wts, weights)), PIPE_TOL[dtype]
    return gkc.rel_err(got, fused_experts_ref(x, idx, wts, weights)), REF_TOL[dtype]


def graph_case(fmt):
    w13, w2 = stacks_of("Qwen3-30B-A3B")
    weights = w4a8(w13, w2, fmt, True)
    idx, wts = gkc.routing(300, 128, 8)
    x = torch.randn(300, 2048, device=DEV).to(torch.bfloat16)
    fused_experts_triton(x, idx, wts, weights)  # warm-up: compiles, fills the Hadamard factor cache
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_experts_triton(x, idx, wts, weights)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    return gkc.rel_err(out, fused_experts_triton(x, idx, wts, weights)), 1e-6


def run_checks(models) -> None:
    for fmt in FORMATS:
        for dtype in (torch.bfloat16, torch.float16):
            gkc.record_check(f"W4A8 quantize_rows bit-exact {fmt} {str(dtype)[6:]}", quantize_case, fmt, dtype)
            for oracle in ("pipeline", "reference"):
                gkc.record_check(f"W4A8 layer small {fmt} {str(dtype)[6:]} vs {oracle}", layer_case, fmt, dtype,
                                 oracle=oracle)
        for n in (768, 1408, 14336):
            gkc.record_check(f"W4A8 rotate+quantize n={n} {fmt} (fraction of codes off)", rotate_case, fmt, n)
        for model in models:
            gkc.record_check(f"W4A8 {model} T=2048 {fmt} hadamard", layer_case, fmt, torch.bfloat16, model, 2048)
        gkc.record_check(f"W4A8 CUDA graph capture + replay {fmt}", graph_case, fmt)


# ------------------------------------------------------------------------------------------- timing
def bench_shape(model, tokens) -> None:
    e, h, i, k = gkc.SHAPES[model]
    w13, w2 = stacks_of(model)
    ref_mod = gkc.bf16_experts(model)
    ref_mod.config._experts_implementation = "grouped_mm"
    for t in tokens:
        sets = [(torch.randn(t, h, device=DEV).to(torch.bfloat16), *gkc.routing(t, e, k)) for _ in range(gkc.SETS)]
        flops = 2 * t * k * 3 * h * i
        row = dict(model=model, T=t, bf16_floor_us=flops / TC_DENSE["bf16"] * 1e6,
                   int8_floor_us=flops / TC_DENSE["8bit"] * 1e6)
        variants = {"w4a16_us": (None, False), "w4a16_had_us": (None, True)}
        for fmt in FORMATS:
            variants[f"w4a8_{fmt}_us"] = (fmt, False)
            variants[f"w4a8_{fmt}_had_us"] = (fmt, True)
        for key, (fmt, had) in variants.items():
            weights = ExpertWeights(w13, w2, "silu", had) if fmt is None else w4a8(w13, w2, fmt, had)
            try:
                def run(weights=weights):
                    for x, idx, wts in sets:
                        fused_experts_triton(x, idx, wts, weights)
                row[key] = gkc.bench_graph(run) / gkc.SETS
            except gkc.FAILURES as exc:
                row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for fmt in FORMATS:
            def quant(fmt=fmt):
                for x, _, _ in sets:
                    quantize_rows(x, ActSpec(8, fmt))
            row[f"quantize_{fmt}_us"] = gkc.bench_graph(quant) / gkc.SETS
        try:
            def base():
                with torch.no_grad():
                    for x, idx, wts in sets:
                        ref_mod(x, idx, wts)
            row["grouped_mm_us"] = gkc.bench_graph(base) / gkc.SETS
        except gkc.FAILURES as exc:
            row["grouped_mm_us_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for key in [a for a in row if a.startswith(("w4a16", "w4a8")) and a.endswith("_us")]:
            if "grouped_mm_us" in row:
                row[key.replace("_us", "_x_vs_grouped_mm")] = row["grouped_mm_us"] / row[key]
        RESULTS["bench"].append(row)
        logger.info("%s T=%d: %s", model, t, {a: round(b, 2) for a, b in row.items() if isinstance(b, float)})
    del ref_mod, w13, w2
    torch.cuda.empty_cache()


def markdown() -> str:
    cols = ["w4a16_us", "w4a8_int_us", "w4a8_fp8_e4m3_us", "w4a8_int_had_us", "w4a8_fp8_e4m3_had_us",
            "quantize_int_us", "grouped_mm_us", "w4a8_int_x_vs_grouped_mm", "w4a8_fp8_e4m3_x_vs_grouped_mm"]
    lines = ["| shape | T | bf16 floor us | 8-bit floor us | " + " | ".join(cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for r in RESULTS["bench"]:
        vals = [gkc.fmt(r.get(c), ".2f" if c.endswith("grouped_mm") else ".1f") for c in cols]
        lines.append(f"| {r['model']} | {r['T']} | {r['bf16_floor_us']:.1f} | {r['int8_floor_us']:.1f} | "
                     + " | ".join(vals) + " |")
    failed = [c for c in RESULTS["checks"] if not c["ok"]]
    lines += ["", f"checks: {len(RESULTS['checks']) - len(failed)}/{len(RESULTS['checks'])} passed"]
    lines += [f"- FAIL {c['name']}: {c.get('error') or c['err']}" for c in failed]
    lines += [f"- bench error {r['model']} T={r['T']} {a}: {b}" for r in RESULTS["bench"] for a, b in r.items()
              if a.endswith("_error")]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), choices=list(gkc.SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=[2048])
    parser.add_argument("--skip-checks", action="store_true", help="timing only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not torch.cuda.is_available():
        logger.error("needs a CUDA GPU")
        return 2
    start = time.perf_counter()
    RESULTS["env"] = gkc.environment()
    torch.manual_seed(0)
    if not args.skip_checks:
        run_checks(args.models)
    for model in args.models:
        bench_shape(model, args.tokens)
    out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS["wall_s"] = round(time.perf_counter() - start, 1)
    (out_dir / f"gpu_w4a8_check-{stamp}.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    header = f"# moeq W4A8 Triton path, {RESULTS['env']}\n\n"
    (out_dir / f"gpu_w4a8_check-{stamp}.md").write_text(header + markdown() + "\n")
    print(header + markdown())
    return 0 if all(c["ok"] for c in RESULTS["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
