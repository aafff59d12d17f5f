"""Does Hadamard rotation lower quantization error? GPTQ with and without ``rotation="hadamard"`` (+ online
Hadamard on expert down inputs) on the shipped demo model, at W4 and W3 g128 (K = 128 here, so one group per
row). Measures, on held-out stdlib text: the mean squared logit error against the full-precision model and
perplexity. Writes ``benchmarks/results/rotation_quality.{md,json}``.

    python benchmarks/rotation_quality.py [--nsamples 32] [--seqlen 256] [--eval-windows 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import moeq
from demo_data import demo_setup


@torch.no_grad()
def _eval(model, ref_logits, windows) -> dict:
    mse, nll, n = 0.0, 0.0, 0
    for w, ref in zip(windows, ref_logits):
        logits = model(w[None]).logits.float()
        mse += float((logits - ref).pow(2).mean())
        nll += float(F.cross_entropy(logits[0, :-1], w[1:], reduction="sum"))
        n += w.numel() - 1
    return {"logit_mse": mse / len(windows), "ppl": math.exp(nll / n)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    fp, tok, calib, held = demo_setup(args.nsamples, args.seqlen)
    windows = [held[i * args.seqlen : (i + 1) * args.seqlen] for i in range(args.eval_windows)]
    with torch.no_grad():
        ref_logits = [fp(w[None]).logits.float() for w in windows]
    rows = [{"config": "fp32", **_eval(fp, ref_logits, windows)}]
    for bits in (4, 3):
        for rot in (None, "hadamard"):
            model = copy.deepcopy(fp)
            cfg = moeq.QuantConfig(method="gptq", bits=bits, group_size=128, rotation=rot, online_hadamard=rot is not None)
            moeq.quantize_model(model, cfg, calib=calib)
            rows.append({"config": f"gptq w{bits}g128" + (" + rotation" if rot else ""), **_eval(model, ref_logits, windows)})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "moeq demo-moe (assets)", "calibration": f"{args.nsamples} x {args.seqlen} stdlib train tokens",
            "eval": f"{args.eval_windows} x {args.seqlen} stdlib held-out tokens", "torch": torch.__version__}
    (args.out / "rotation_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Rotation vs. no rotation (GPTQ, demo model, CPU)", "", *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| config | logit MSE vs fp32 | perplexity |", "|---|---|---|"]
    lines += [f"| {r['config']} | {r['logit_mse']:.5f} | {r['ppl']:.4f} |" for r in rows]
    (args.out / "rotation_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
