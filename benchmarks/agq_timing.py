"""Quantization time of AGQ vs GPTQ, and of EBSS generation, on the shipped demo model (CPU).

    python benchmarks/agq_timing.py     # 15 min on a loaded 2-core box (1 thread)
                                        # writes benchmarks/results/agq_timing.{md,json}

Each method quantizes a fresh copy of the demo model (W4 and W3 g128, routed experts and the ``all`` scope) on
the same ``--nsamples`` x ``--seqlen`` plain-text windows; runs are interleaved GPTQ, AGQ, GPTQ, AGQ, ... and
the minimum over ``--repeats`` is reported (the box is shared, so the minimum is the least disturbed run).
The time is split into calibration passes (``CalibExperts.forward`` and the linear-input hooks, i.e. Hessian
accumulation with the affinity weighting) and the GPTQ solves (``gptq_quantize``), by wrapping both.
A SHA-256 digest of every packed tensor (qweight / scales / qzeros, in state-dict order) of each run shows
the outputs are bit-identical across repeats. EBSS: ``ebss_generate`` of the same number of samples and
tokens (default settings, seed 0).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moeq  # noqa: E402
from benchmarks.bench_common import git_commit  # noqa: E402
import moeq.quantizers.gptq_layer as gptq_layer  # noqa: E402
from moeq.calib.capture import CalibExperts  # noqa: E402
from moeq.calib.ebss import EBSSConfig, ebss_generate  # noqa: E402
from benchmarks.demo_data import demo_setup, write_results  # noqa: E402

SCOPES = {"experts": [], "all": ["attention", "shared_experts"]}


class Timers:
    """Wall time spent inside wrapped callables, by name (installed for the duration of a ``with`` block)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._undo = []

    def wrap(self, owner, attr: str, name: str) -> None:
        orig = getattr(owner, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig))

    def __enter__(self):
        self.wrap(CalibExperts, "forward", "calib_experts")
        for fn in ("gptq_quantize", "gptq_quantize_stack"):  # one matrix / a batched stack of experts
            if hasattr(gptq_layer, fn):
                self.wrap(gptq_layer, fn, "gptq_solve")
        return self

    def __exit__(self, *exc):
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)


def packed_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[-1].rsplit("_", 1)[-1] in ("qweight", "scales", "qzeros"):
            h.update(name.encode())
            h.update(t.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def quantize_once(fp, method: str, bits: int, scope: str, calib) -> dict:
    model = copy.deepcopy(fp)
    cfg = moeq.QuantConfig(method=method, bits=bits, group_size=128, quantize_linears=SCOPES[scope])
    with Timers() as tm:
        t0 = time.perf_counter()
        moeq.quantize_model(model, cfg, calib=calib)
        total = time.perf_counter() - t0
    return {"method": method, "bits": bits, "scope": scope, "seconds": total,
            "calib_experts": tm.seconds.get("calib_experts", 0.0), "gptq_solve": tm.seconds.get("gptq_solve", 0.0),
            "digest": packed_digest(model)}



def markdown(res: dict) -> str:
    m = res["meta"]
    out = ["# AGQ vs GPTQ quantization time (demo model, CPU)", "",
           (f"{m['nsamples']} x {m['seqlen']} plain-text calibration tokens, g128, minimum of {m['repeats']} "
            f"interleaved runs, {m['threads']} thread(s). Python {m['python']}, torch {m['torch']}, commit "
            f"{m['commit']}, {m['date']}."), "", f"Command: `{m['command']}`", "",
           ("`calibration` = time inside `CalibExperts.forward` (routed-expert Hessians incl. the affinity "
            "weights); `solve` = time inside `gptq_quantize` / `gptq_quantize_stack`; `digests` = distinct "
            "SHA-256 digests of the packed "
            "tensors over the repeats (1 = bit-identical every run)."), "",
           "| scope | bits | method | total s | calibration s | solve s | AGQ / GPTQ | digests |",
           "|---|---|---|---|---|---|---|---|"]
    for r in res["table"]:
        ratio = "" if r["method"] == "gptq" else f"{r['ratio']:.3f}"
        out.append(f"| {r['scope']} | W{r['bits']} | {r['method']} | {r['seconds']:.2f} | {r['calib_experts']:.2f} | "
                   f"{r['gptq_solve']:.2f} | {ratio} | {r['digests']} |")
    e = res["ebss"]
    out += ["", (f"EBSS generation of the same {m['nsamples']} x {m['seqlen']} tokens (default settings: beam "
                 f"{e['beam']}, tau {e['tau']:g}): {e['seconds']:.1f} s, {e['seconds'] / res['gptq_ref']:.1f}x the "
                 f"GPTQ W4 `experts` quantization it calibrates.")]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=list(SCOPES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agq_timing"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp, tok, calib, _ = demo_setup(args.nsamples, args.seqlen)
    runs = []
    for scope in args.scopes:
        for bits in (4, 3):
            for _ in range(args.repeats):
                for method in ("gptq", "agq"):
                    runs.append(quantize_once(fp, method, bits, scope, calib))
                    print(runs[-1], flush=True)
    table = []
    for scope in args.scopes:
        for bits in (4, 3):
            best = {}
            for method in ("gptq", "agq"):
                rs = [r for r in runs if r["scope"] == scope and r["bits"] == bits and r["method"] == method]
                b = min(rs, key=lambda r: r["seconds"])
                best[method] = {**b, "digests": len({r["digest"] for r in rs})}
            best["agq"]["ratio"] = best["agq"]["seconds"] / best["gptq"]["seconds"]
            table += [best["gptq"], best["agq"]]
    cfg = EBSSConfig(nsamples=args.nsamples, seqlen=args.seqlen)
    t0 = time.perf_counter()
    ebss_generate(fp, tok, cfg, progress=False)
    ebss = {"seconds": time.perf_counter() - t0, "beam": cfg.beam, "tau": cfg.tau}
    gptq_ref = next(r["seconds"] for r in table if r["method"] == "gptq" and r["scope"] == "experts" and r["bits"] == 4)
    res = {"runs": runs, "table": table, "ebss": ebss, "gptq_ref": gptq_ref, "meta": {
        "date": datetime.date.today().isoformat(), "commit": git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": args.threads, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "repeats": args.repeats, "command": " ".join(["python benchmarks/agq_timing.py", *sys.argv[1:]])}}
    write_results(args.out, res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
