"""Smoothing + 8-bit router alignment + GPTQ on the demo model: the one-pass streaming pipeline vs the
whole-model path (three walks over the layers), side by side in one run; wall time and held-out perplexity.

    python benchmarks/one_pass.py          # writes benchmarks/results/one_pass.{md,json}

Both runs read the same source checkpoint (the shipped demo model), use the same calibration windows and
settings (W4 g128 sym, MSE clip, GPTQ, smoothing alpha 0.5 max, KL-aligned 8-bit routers) and write a moeq
checkpoint; the order of the two runs alternates over ``--repeats`` so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_common import git_commit  # noqa: E402
from benchmarks.demo_data import demo_setup, write_results  # noqa: E402


def _whole_model(src, out, config, calib):
    import moeq
    from moeq.io.source import load_source_model

    model = load_source_model(src)
    moeq.quantize_model(model, config, calib=calib)
    moeq.save_quantized(model, out, overwrite=True)


def _streaming(src, out, config, calib):
    from moeq.pipeline import quantize_checkpoint

    quantize_checkpoint(src, out, config, calib, overwrite=True)


def _ppl(path, held, seqlen, windows) -> float:
    import moeq
    from moeq.eval.perplexity import perplexity

    return perplexity(moeq.load_quantized(path).eval(), held, seqlen, max_windows=windows)["ppl"]


def markdown(res: dict) -> str:
    lines = ["# One pass: smoothing + 8-bit router alignment + GPTQ (demo model, CPU)", "",
             f"- date: {res['date']}; commit: {res['commit']}; torch {res['torch']}; {res['machine']}, "
             f"{res['threads']} threads", f"- command: `{res['command']}`",
             f"- settings: {res['settings']}; calibration {res['nsamples']} x {res['seqlen']} tokens; perplexity on "
             f"{res['eval_windows']} held-out windows of {res['seqlen']}", "",
             "| path | walks over the layers | wall s (each repeat) | mean wall s | held-out ppl |", "|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        lines.append(f"| {name} | {r['walks']} | {', '.join(f'{t:.1f}' for t in r['wall_s'])} | "
                     f"{sum(r['wall_s']) / len(r['wall_s']):.1f} | {r['ppl']:.4f} |")
    lines += ["", "The whole-model path smooths with full-precision activations and aligns routers on the outputs of "
              "smoothed full-precision layers; the streaming pass gives every stage the outputs of the already "
              "quantized earlier layers (as GPTQ always had), so the two checkpoints differ slightly.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from moeq.assets import demo_model_path
    from moeq.config import QuantConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "one_pass"))
    args = ap.parse_args(argv)
    _, _, calib, held = demo_setup(args.nsamples, args.seqlen)
    config = QuantConfig(method="gptq", bits=4, group_size=128, smooth=True, router_bits=8)
    src = demo_model_path()
    runs = {"whole model (quantize_model + save_quantized)": {"fn": _whole_model, "walks": 3, "wall_s": []},
            "streaming (quantize_checkpoint)": {"fn": _streaming, "walks": 1, "wall_s": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
            for name in order:
                out = Path(tmp) / name.split()[0]
                t0 = time.perf_counter()
                runs[name]["fn"](src, out, config, calib)
                runs[name]["wall_s"].append(time.perf_counter() - t0)
        for name in runs:
            runs[name]["ppl"] = _ppl(Path(tmp) / name.split()[0], held, args.seqlen, args.eval_windows)
            del runs[name]["fn"]
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
           "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
           "command": "python benchmarks/one_pass.py " + " ".join(argv or sys.argv[1:]),
           "settings": "gptq w4 g128 sym, clip, smooth alpha 0.5 max + down, router_bits 8 (KL-aligned)",
           "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows, "runs": runs}
    write_results(args.out, res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
