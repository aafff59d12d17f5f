"""Uniform W3 vs mixed 3.0-bit average vs W4 on the shipped demo model (routed experts, GPTQ, g128).

The mixed plan gives 4 bits to the most important experts and 2 bits to the rest (``moeq.mixed``: affinity-mass
scores from the calibration tokens, expert granularity) so the average over routed-expert weights is 3.0 bits.
Measures held-out perplexity and per-layer top-k routing agreement with the full-precision model. Writes
``benchmarks/results/mixed_quality.{md,json}``.

    python benchmarks/mixed_quality.py [--nsamples 32] [--seqlen 256] [--eval-windows 32]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import moeq
from demo_data import demo_setup
from moeq.eval.perplexity import perplexity
from moeq.eval.routing import routing_agreement
from moeq.mixed import average_bits, plan_mixed_precision


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    fp, tok, calib, held = demo_setup(args.nsamples, args.seqlen)
    adapter = moeq.adapter_for(fp)
    plan = plan_mixed_precision(fp, adapter, 3.0, "affinity", "expert", (2, 4), calib)
    configs = [("uniform W3", {"bits": 3}), ("mixed 2/4, avg 3.0", {"bits": 3, "expert_bits": plan}),
               ("uniform W4", {"bits": 4})]
    rows = [{"config": "fp32", "avg_bits": 32.0,
             "ppl": perplexity(fp, held, args.seqlen, max_windows=args.eval_windows)["ppl"], "topk_overlap": 1.0}]
    for name, kw in configs:
        model = copy.deepcopy(fp)
        moeq.quantize_model(model, moeq.QuantConfig(method="gptq", group_size=128, **kw), calib=calib)
        agree = routing_agreement(model, fp, held, args.seqlen, max_windows=args.eval_windows)
        bits = average_bits(fp, adapter, plan) if "expert_bits" in kw else float(kw["bits"])
        rows.append({"config": name, "avg_bits": bits,
                     "ppl": perplexity(model, held, args.seqlen, max_windows=args.eval_windows)["ppl"],
                     "topk_overlap": agree["topk_overlap"], "exact_match": agree["exact_match"]})
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "moeq demo-moe", "method": "gptq g128, routed experts only",
            "calibration": f"{args.nsamples} x {args.seqlen} stdlib train tokens",
            "eval": f"{args.eval_windows} x {args.seqlen} stdlib held-out tokens", "torch": torch.__version__}
    (args.out / "mixed_quality.json").write_text(json.dumps({"meta": meta, "plan": plan, "rows": rows}, indent=2))
    lines = ["# Uniform vs mixed precision (demo model, CPU)", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| config | avg bits (expert weights) | perplexity | top-k overlap |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['avg_bits']:.2f} | {r['ppl']:.4f} | {r['topk_overlap']:.4f} |" for r in rows]
    (args.out / "mixed_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
