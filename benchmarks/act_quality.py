"""Activation quantization quality: W4A16 / W4A8 (INT8, FP8 e4m3) / W4A4 x {RTN, GPTQ, AGQ} x {plain, rotation,
smoothing, both}, held-out perplexity and routing agreement, on the demo model and a tiny model of each family.

    OMP_NUM_THREADS=1 python benchmarks/act_quality.py      # writes benchmarks/results/act_quality.{md,json}

Fixed settings (not tuned on the results):

* weights: 4-bit symmetric, MSE clip search, group 128 (demo) / 32 (tiny models); routed experts only (attention,
  shared experts, routers stay 16-bit; so do their inputs);
* activations: the routed experts' gate_up input and down input (after the online Hadamard when rotated),
  dynamic per token, symmetric (``moeq_kernels.act_quant``), each layer's two clip ratios searched on the
  calibration tokens (``act_clip_search``, grid ``QuantConfig().act_clip_grid``); computed by the reference
  backend (fake-quant), i.e. what ``moeq eval`` measures; GPTQ/AGQ Hessians from 16-bit inputs (QuaRot's
  convention, ``act_hessian="fp"``);
* rotation: QuaRot-style random Hadamard of the residual stream + online Hadamard on the routed down input;
  smoothing: EAQuant expert-aware smoothing, alpha 0.5, ``max`` aggregation, down smoothing on; ``both``: the
  composition of ``moeq.quantize.transform_model`` (rotate, smooth in the rotated basis, online Hadamard);
* demo model: calibration ``--nsamples`` x ``--seqlen`` random windows of ``stdlib_text("train")``, evaluation
  the first ``--eval-windows`` x 256 tokens of ``stdlib_text("heldout")``; tiny models (random weights, byte
  tokenizer): the same texts as bytes, ``--tiny-nsamples`` x 64 calibration, ``--tiny-eval-windows`` x 64
  evaluation. ``+-`` is two standard errors of the paired per-window NLL difference (evaluation noise only).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_common import git_commit  # noqa: E402
from benchmarks.demo_data import evaluate, write_results  # noqa: E402
import moeq  # noqa: E402
from moeq.act_calib import calibrate_act  # noqa: E402
from moeq.calib.data import random_windows  # noqa: E402
from moeq.calib.stdlib import stdlib_text  # noqa: E402
from moeq.testing import TINY_CONFIGS, tiny_model, tiny_tokenizer  # noqa: E402

ACTS = [("W4A16", None, "int"), ("W4A8-INT8", 8, "int"), ("W4A8-FP8", 8, "fp8_e4m3"), ("W4A4", 4, "int")]
METHODS = ["rtn", "gptq", "agq"]
TRANSFORMS = {"plain": {}, "rotation": {"rotation": "hadamard", "online_hadamard": True}, "smoothing": {"smooth": True},
              "both": {"rotation": "hadamard", "online_hadamard": True, "smooth": True}}


@torch.no_grad()
def quant_config(method: str, act_bits, act_format: str, transform: str, group: int, bits: int = 4) -> moeq.QuantConfig:
    return moeq.QuantConfig(method=method, bits=bits, group_size=group, act_bits=act_bits, act_format=act_format,
                            act_clip_search=act_bits is not None, **TRANSFORMS[transform])


def act_label(act: str, bits: int) -> str:
    """``W4A4`` -> ``W3A4`` for 3-bit weights (the ACTS names are written for 4-bit weights)."""
    return act.replace("W4", f"W{bits}", 1)


def run_model(name: str, fp, calib: torch.Tensor, held: torch.Tensor, seqlen: int, group: int, t_start: float,
              sel: argparse.Namespace) -> dict:
    """Every (transform, method) is quantized once at W4A16; each activation mode then gets a copy of that model
    with its activation specs calibrated (``moeq.act_calib.calibrate_act``, the last step of ``quantize_model``).
    This is what ``quantize_model`` with the act config computes: with ``act_hessian="fp"`` the weights do not
    depend on the activation settings (``tests/moeq/test_act_calib.py``), so the 4x cheaper run is the same."""
    from moeq.models import adapter_for

    fp_res = evaluate(fp, held, seqlen, None)
    fp_routes = fp_res.pop("routes")
    rows = []
    for wbits, transform, method in itertools.product(sel.weight_bits, sel.transforms, sel.methods):
        t0 = time.perf_counter()
        wq = copy.deepcopy(fp)
        moeq.quantize_model(wq, quant_config(method, None, "int", transform, group, wbits), calib=calib)
        w_s = time.perf_counter() - t0
        for act, bits, fmt in (a for a in ACTS if a[0] in sel.acts):
            t0 = time.perf_counter()
            model, rec = wq, {}
            if bits is not None:
                model = copy.deepcopy(wq)
                rec = calibrate_act(model, adapter_for(model),
                                    quant_config(method, bits, fmt, transform, group, wbits), calib)
            a_s = time.perf_counter() - t0
            r = evaluate(model, held, seqlen, fp_routes)
            clips = [v for m in rec.get("modules", {}).values() for k, v in m.items() if k.endswith("_clip")]
            r.update(transform=transform, method=method, act=act, bits=wbits, weight_seconds=round(w_s, 1),
                     act_calib_seconds=round(a_s, 1), clip_min=min(clips, default=None),
                     clip_max=max(clips, default=None))
            rows.append(r)
            print(f"[{time.perf_counter() - t_start:6.0f}s] {name:11s} {transform:9s} {method:4s} "
                  f"{act_label(act, wbits):9s} "
                  f"ppl {r['ppl']:.4f} overlap {r['topk_overlap']:.4f} (weights {w_s:.1f}s, act {a_s:.1f}s)",
                  flush=True)
    return {"fp": fp_res, "rows": rows, "calib_tokens": int(calib.numel()), "eval_tokens": int(held.numel()),
            "seqlen": seqlen, "group_size": group}


def demo_inputs(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = moeq.demo_model_path()
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    train = torch.tensor(tok(stdlib_text("train", max_bytes=1_000_000))["input_ids"])
    held = torch.tensor(tok(stdlib_text("heldout", max_bytes=args.eval_windows * 256 * 2))["input_ids"])
    held = held[: min(held.numel() // 256, args.eval_windows) * 256]
    return fp, random_windows(train, args.nsamples, args.seqlen, seed=getattr(args, "calib_seed", 0)), held


def tiny_inputs(family: str, args):
    tok = tiny_tokenizer()
    train = torch.tensor(tok(stdlib_text("train", max_bytes=200_000))["input_ids"])
    held = torch.tensor(tok(stdlib_text("heldout", max_bytes=args.tiny_eval_windows * 64 * 2))["input_ids"])
    held = held[: args.tiny_eval_windows * 64]
    return tiny_model(family), random_windows(train, args.tiny_nsamples, 64, seed=0), held


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    res = {"models": {}}
    fp, calib, held = demo_inputs(args)
    res["models"]["demo"] = run_model("demo", fp, calib, held, 256, 128, t_start, args)
    for family in args.families:
        fp, calib, held = tiny_inputs(family, args)
        res["models"][f"tiny {family}"] = run_model(family, fp, calib, held, 64, 32, t_start, args)
    res["meta"] = {
        "date": datetime.date.today().isoformat(), "commit": git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": args.threads, "seconds": round(time.perf_counter() - t_start, 1),
        "clip_grid": moeq.QuantConfig().act_clip_grid, "weight_bits": args.weight_bits, "methods": args.methods,
        "transforms": args.transforms, "acts": args.acts, "calib_seed": args.calib_seed, "load": os.getloadavg(),
        "command": " ".join(["python benchmarks/act_quality.py", *sys.argv[1:]]),
    }
    return res


def _row(rows, transform, method, act, bits=4):
    # rows of results written before --weight-bits existed have no "bits": they are 4-bit
    return next(r for r in rows if (r["transform"], r["method"], r["act"], r.get("bits", 4)) ==
                (transform, method, act, bits))


def _paired(row: dict, base: dict) -> tuple[float, float]:
    """Relative perplexity change of ``row`` vs ``base`` (percent) and two standard errors of the paired
    per-window NLL difference (percent)."""
    d = torch.tensor(row["window_nll"], dtype=torch.float64) - torch.tensor(base["window_nll"], dtype=torch.float64)
    se = float(d.std(correction=1)) / math.sqrt(d.numel()) if d.numel() > 1 else float("nan")
    return 100 * math.expm1(float(d.mean())), 200 * se


def markdown(res: dict) -> str:
    m = res["meta"]
    wbits, methods = m.get("weight_bits", [4]), m.get("methods", METHODS)
    transforms, acts = m.get("transforms", list(TRANSFORMS)), m.get("acts", [a for a, _, _ in ACTS])
    out = ["# Activation quantization quality (moeq)", "",
           (f"Symmetric {'/'.join(map(str, wbits))}-bit weights (MSE clip search), routed experts only; activations "
            f"of the routed experts quantized per token (dynamic, symmetric) with per-layer clip ratios searched on "
            f"the calibration tokens (grid {m['clip_grid']}), evaluated through the reference backend. Python "
            f"{m['python']}, torch {m['torch']}, {m['threads']} thread(s), commit {m['commit']}, {m['date']}, "
            f"{m['seconds']:.0f}s" + (f", load average at the end {m['load'][0]:.1f}" if "load" in m else "")
            + (f", demo calibration windows drawn with seed {m['calib_seed']}" if "calib_seed" in m else "") + "."),
           "", f"Command: `{m['command']}`", "",
           "Cells: perplexity (relative change vs the 16-bit-activation column of the same method and transform) / "
           "top-k routing overlap with the FP model [range of the searched clip ratios]. Tiny models are randomly "
           "initialized (byte vocabulary, perplexity near 256): they check the pipeline on every family's structure, "
           "their differences are not quality evidence.", ""]
    for name, r in res["models"].items():
        out += _model_tables(name, r, wbits, methods, transforms, acts)
    return "\n".join(out) + "\n"


def _model_tables(name: str, r: dict, wbits, methods, transforms, acts) -> list[str]:
    rows = r["rows"]
    out = [f"## {name} (FP perplexity {r['fp']['ppl']:.4f}; group {r['group_size']}; calibration "
           f"{r['calib_tokens']} tokens; evaluation {r['eval_tokens']} tokens = {r['eval_tokens'] // r['seqlen']} "
           f"windows of {r['seqlen']})", ""]
    for b in wbits:
        out += ["| method | transform | " + " | ".join(act_label(a, b) for a in acts) + " |",
                "|---|---|" + "---|" * len(acts)]
        for method in methods:
            for transform in transforms:
                base = _row(rows, transform, method, "W4A16", b)
                cells = []
                for act in acts:
                    x = _row(rows, transform, method, act, b)
                    rel = "" if act == "W4A16" else f" ({_paired(x, base)[0]:+.2f}%)"
                    clip = "" if x["clip_min"] is None else f" [clip {x['clip_min']:.2f}-{x['clip_max']:.2f}]"
                    cells.append(f"{x['ppl']:.4f}{rel} / {x['topk_overlap']:.3f}{clip}")
                out.append(f"| {method.upper()} | {transform} | " + " | ".join(cells) + " |")
        out.append("")
        others = [t for t in transforms if t != "plain"]
        if "W4A4" in acts and "plain" in transforms and others:
            out += [f"{act_label('W4A4', b)}, each transform vs plain (same method): relative perplexity change "
                    "± 2 SE (paired over evaluation windows); negative = better.", "",
                    "| method | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
            for method in methods:
                plain = _row(rows, "plain", method, "W4A4", b)
                cells = []
                for t in others:
                    d, se = _paired(_row(rows, t, method, "W4A4", b), plain)
                    cells.append(f"{d:+.2f}% ± {se:.2f}")
                out.append(f"| {method.upper()} | " + " | ".join(cells) + " |")
            out.append("")
    a8 = [a for a in ("W4A8-INT8", "W4A8-FP8") if a in acts]
    if a8:
        worst = max(abs(_paired(_row(rows, t, me, a, b), _row(rows, t, me, "W4A16", b))[0])
                    for t in transforms for me in methods for a in a8 for b in wbits)
        out += [f"Largest |A8 - A16| perplexity change over all methods and transforms: {worst:.2f}%.", ""]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--tiny-nsamples", type=int, default=8)
    ap.add_argument("--tiny-eval-windows", type=int, default=16)
    ap.add_argument("--families", nargs="*", default=sorted(TINY_CONFIGS), choices=sorted(TINY_CONFIGS))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=list(TRANSFORMS))
    ap.add_argument("--acts", nargs="+", default=[a for a, _, _ in ACTS], choices=[a for a, _, _ in ACTS],
                    help="activation columns (named for 4-bit weights; W4A16 is always run: it is the baseline)")
    ap.add_argument("--calib-seed", type=int, default=0, help="which random calibration windows (demo model)")
    ap.add_argument("--weight-bits", nargs="+", type=int, default=[4], choices=[2, 3, 4, 8])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core box)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "act_quality"))
    args = ap.parse_args(argv)
    args.acts = ["W4A16"] + [a for a in args.acts if a != "W4A16"]
    write_results(args.out, run(args), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
