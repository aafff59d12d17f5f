"""EBSS balance temperature sweep across expert counts: usage CV vs unguided sampling, fluency, degeneration.

    python benchmarks/ebss_sweep.py --seeds 0 1   # ~25 min on a shared 2-core box (1 thread)
                                                  # writes benchmarks/results/ebss_sweep.{md,json}
    python benchmarks/ebss_sweep.py --merge a.json b.json   # one table from runs split over processes

Models (fixed before the sweep, not tuned on its results):

* ``demo``: the shipped trained demo model (Qwen2-MoE, E=8, top-2), with its byte tokenizer;
* skew-routed tiny models of several families (``moeq.testing.tiny_model`` with the expert count / top-k
  overridden), E = 8 ... 128: each MoE layer's router row e is multiplied by ``exp(beta * g_e)``, ``g_e ~ N(0, 1)``
  (seeded per model), ``beta = 1``. A row with a larger norm gives its expert a wider logit spread, so it wins
  top-k far more often: unguided usage CV ~1 (a few experts take most tokens), like the skewed routers of real
  checkpoints. ``lm_head`` is multiplied by 16 so the next-token distributions are peaked (unguided mean
  log-prob about -1.3 nats/token, close to a trained model's) and fluency and balance really trade off.

Per model and setting (``--settings BALANCE:K:TAU``): ``--nsamples`` x ``--seqlen`` EBSS samples (beam 4,
K candidates per beam, batch 16) for each sampling seed. ``tau = inf`` is the unguided beam sampler (balance
term off). Columns: dataset usage CV (mean over layers of std/mean of the expert counts of all accepted
samples) relative to unguided; mean log-prob of accepted samples; degenerate rate (rejected / generated);
min tokens per expert (over layers) and few-token experts (under 0.5% of the layer's tokens, all layers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_common import git_commit  # noqa: E402
from moeq.assets import demo_model_path  # noqa: E402
from moeq.calib.data import random_windows  # noqa: E402
from moeq.calib.ebss import EBSSConfig, ebss_generate, expert_usage_cv  # noqa: E402
from moeq.calib.expert_tokens import layer_token_stats, summarize_layers  # noqa: E402
from moeq.calib.stdlib import stdlib_text  # noqa: E402
from moeq.eval.routing import expert_counts  # noqa: E402
from moeq.models import adapter_for  # noqa: E402
from moeq.testing import tiny_model, tiny_tokenizer  # noqa: E402

SKEW_BETA, LM_SCALE = 1.0, 16.0
# unguided; the former default (cv of each sample's counts, 4 candidates per beam, tau 0.25); the marginal
# squared-cv gain (moeq.calib.ebss.balance_gain) at 4 / 8 / 16 candidates and a few taus
DEFAULT_SETTINGS = ["sample:4:inf", "sample:4:0.25", "marginal:4:0.3", "marginal:8:0.5", "marginal:8:0.3",
                    "marginal:8:0.2", "marginal:16:0.3"]
# (name, family, tiny-config overrides); top-k as in the family's real checkpoints where the tiny dims allow
MODELS = [
    ("mixtral E8 k2", "mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    ("qwen2_moe E16 k2", "qwen2_moe", dict(num_experts=16, num_experts_per_tok=2)),
    ("deepseek_v3 E32 k4", "deepseek_v3", dict(n_routed_experts=32, num_experts_per_tok=4, n_group=1, topk_group=1)),
    ("olmoe E64 k8", "olmoe", dict(num_experts=64, num_experts_per_tok=8)),
    ("deepseek_v2 E64 k6", "deepseek_v2", dict(n_routed_experts=64, num_experts_per_tok=6)),
    ("qwen3_moe E128 k8", "qwen3_moe", dict(num_experts=128, num_experts_per_tok=8)),
]


@torch.no_grad()
def skew_routed(family: str, overrides: dict, seed: int = 0):
    """A tiny random model whose routers are skewed and whose next-token distributions are peaked (see module
    docstring); ``lm_head`` must not be tied to the embedding (it is not in any tiny config)."""
    model = tiny_model(family, seed=seed, **overrides)
    if model.config.tie_word_embeddings:
        raise ValueError(f"{family}: lm_head is tied to the embedding; scaling it would change the inputs")
    ad = adapter_for(model)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _, block in ad.moe_layers(model):
        w = ad.router(block).weight
        w.mul_(torch.exp(SKEW_BETA * torch.randn(w.shape[0], generator=gen, dtype=torch.float64)).to(w.dtype)[:, None])
    model.lm_head.weight.mul_(LM_SCALE)
    return model


def parse_setting(spec: str) -> tuple[str, str, int, float]:
    """``"BALANCE:K:TAU"`` (e.g. ``marginal:8:0.3``; ``TAU`` may be ``inf``) -> ``(label, balance, K, tau)``."""
    balance, k, tau = spec.split(":")
    t = float(tau)
    label = "unguided" if math.isinf(t) else f"{balance} K{int(k)} @{t:g}"
    return label, balance, int(k), t


def run_model(name, model, tok, args, plain_ids=None) -> list[dict]:
    from moeq.eval.routing import RouterTap

    tap = RouterTap(model)
    E, layers = tap.num_experts, tap.layers
    rows = []
    for label, balance, K, tau in map(parse_setting, args.settings):
        for seed in args.seeds:
            t0 = time.perf_counter()
            cfg = EBSSConfig(nsamples=args.nsamples, seqlen=args.seqlen, beam=4, candidates=K, tau=tau, batch=16,
                             seed=seed, balance=balance)
            s = ebss_generate(model, tok, cfg, progress=False).summary
            counts = torch.tensor(s["expert_counts"])
            rows.append({"model": name, "E": E, "k": tap.top_k, "setting": label, "balance": balance,
                         "candidates": K, "seed": seed, "tau": tau if math.isfinite(tau) else "inf",
                         "cv": s["dataset_cv"], "mean_logprob": s["mean_logprob"], "accepted": s["accepted"],
                         "generated": s["generated"], "rejected": s["rejected_total"],
                         "tokens": summarize_layers(s["expert_tokens"]), "counts": counts.tolist(),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:20s} {label:12s} seed {seed}: cv {s['dataset_cv']:.3f} lp {s['mean_logprob']:.3f} "
                  f"rejected {s['rejected_total']}/{s['generated']} ({rows[-1]['seconds']}s)", flush=True)
    if plain_ids is not None:
        for seed in args.seeds:
            ids = random_windows(plain_ids, args.nsamples, args.seqlen, seed=seed)
            c = expert_counts(model, ids, args.seqlen)
            rows.append({"model": name, "E": E, "k": tap.top_k, "setting": "plain text", "tau": None, "seed": seed,
                         "cv": float(expert_usage_cv(c)), "mean_logprob": None, "accepted": args.nsamples,
                         "generated": args.nsamples, "rejected": 0, "counts": c.tolist(),
                         "tokens": summarize_layers(layer_token_stats(c, ids.numel(), layers))})
    return rows



def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def aggregate(rows: list[dict]) -> list[dict]:
    """Seed means per (model, setting); CV ratio against the same model's unguided rows (same seeds)."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        base = _mean([r["cv"] for r in mine if r["setting"] == "unguided"])
        for label in dict.fromkeys(r["setting"] for r in mine):
            rs = [r for r in mine if r["setting"] == label]
            ratios = [r["cv"] / base for r in rs]
            out.append({"model": name, "E": rs[0]["E"], "k": rs[0]["k"], "setting": label, "tau": rs[0]["tau"],
                        "cv": _mean([r["cv"] for r in rs]), "cv_ratio": _mean(ratios),
                        "cv_ratio_range": [min(ratios), max(ratios)],
                        "mean_logprob": _mean([r["mean_logprob"] for r in rs]),
                        "degenerate_rate": sum(r["rejected"] for r in rs) / sum(r["generated"] for r in rs),
                        "min_tokens": min(r["tokens"]["min"] for r in rs),
                        "under_threshold": _mean([r["tokens"]["under_threshold"] for r in rs]),
                        "experts": rs[0]["tokens"]["experts"]})
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    out = ["# EBSS balance sweep across expert counts", "",
           (f"{m['nsamples']} samples x {m['seqlen']} tokens per run, beam 4 x K candidates, sampling seeds "
            f"{', '.join(map(str, m['seeds']))} (ratios and log-probs are seed means; `range` = min-max of the "
            f"per-seed CV ratios). Skew-routed tiny models: router rows x exp({SKEW_BETA:g} g_e), lm_head x "
            f"{LM_SCALE:g} (see `benchmarks/ebss_sweep.py`). Python {m['python']}, torch {m['torch']}, 1 thread, "
            f"commit {m['commit']}, {m['date']}, {m['seconds']:.0f}s."), "", "Command: " + (m["command"] if "`" in m["command"] else f"`{m['command']}`"), "",
           ("`CV / unguided`: dataset expert-usage CV (mean over MoE layers of std/mean of the counts) divided by "
            "the same model's unguided beam samples (tau = inf). `few-token experts`: experts under 0.5% of the "
            "layer's tokens, summed over layers, of `experts` (layers x E). `sample K4 @0.25`: the former default "
            "(cv of each sample's own counts); `marginal`: the squared-cv gain of each token against the dataset "
            "it joins (`moeq.calib.ebss.balance_gain`)."), "",
           "| model | E | k | setting | CV | CV / unguided (range) | mean log-prob | degenerate | min tokens/expert "
           "| few-token experts |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in res["table"]:
        lp = "-" if a["mean_logprob"] is None else f"{a['mean_logprob']:.3f}"
        lo, hi = a["cv_ratio_range"]
        out.append(f"| {a['model']} | {a['E']} | {a['k']} | {a['setting']} | {a['cv']:.3f} | {a['cv_ratio']:.2f} "
                   f"({lo:.2f}-{hi:.2f}) | {lp} | {a['degenerate_rate']:.3f} | {a['min_tokens']} | "
                   f"{a['under_threshold']:g} / {a['experts']} |")
    return "\n".join(out) + "\n"


def write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def merge(paths: list[str], out: Path) -> int:
    """One table from result files of the same script run as several processes (their meta must agree on the
    sample sizes); the merged meta lists every part's command and the sum of their times."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    metas = [p["meta"] for p in parts]
    if len({(m["nsamples"], m["seqlen"]) for m in metas}) != 1:
        raise ValueError("the parts were run with different --nsamples / --seqlen")
    rows = [r for p in parts for r in p["rows"]]
    meta = {**metas[0], "seeds": sorted({s for m in metas for s in m["seeds"]}),
            "seconds": sum(m["seconds"] for m in metas), "command": " and ".join(f"`{m['command']}`" for m in metas)
            + f" in parallel, then `python benchmarks/ebss_sweep.py --merge ...`"}
    write({"rows": rows, "table": aggregate(rows), "meta": meta}, out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, metavar="BALANCE:K:TAU",
                    help="balance term, candidates per beam and tau of each run (tau inf = unguided)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--models", nargs="*", default=None, help="subset of model names (default: demo + all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ebss_sweep"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no runs: aggregate the rows of these result files into one table at --out")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    if args.models is None or "demo" in args.models:
        demo = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(demo_model_path())
        plain = torch.tensor(tok(stdlib_text("train", max_bytes=400_000))["input_ids"])
        rows += run_model("demo (trained) E8 k2", demo, tok, args, plain)
    tok = tiny_tokenizer()
    for name, family, ov in MODELS:
        if args.models is None or name in args.models:
            rows += run_model(name, skew_routed(family, ov), tok, args)
    res = {"rows": rows, "table": aggregate(rows), "meta": {
        "date": datetime.date.today().isoformat(), "commit": git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "nsamples": args.nsamples, "seqlen": args.seqlen, "seeds": args.seeds,
        "settings": args.settings, "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python benchmarks/ebss_sweep.py", *sys.argv[1:]])}}
    write(res, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
