"""EBSS, Expert-Balanced Self-Sampling (after MoEQuant): the model writes its own calibration sequences.

Each sample starts from a random printable first token and grows by a beam search of width ``W``:

1. every beam proposes ``K`` distinct next tokens, drawn without replacement from its own next-token
   distribution (Gumbel top-k at ``temperature``; seeded), so the search does not lock into the single
   greedy continuation that makes plain beam search loop;
2. all ``W*K`` candidates are run through the model as one batch (one token each on a shared
   ``DynamicCache``), so the routing of the candidate token itself is known: forward hooks on each MoE
   block's router add its top-k experts to the candidate's usage counts;
3. each candidate is scored ``score = mean_logprob - B / tau`` and the ``W`` best survive.

``mean_logprob`` is the mean log-probability of the sequence's tokens after the random first one (fluency).
``B`` is the balance term, by ``balance``:

* ``"marginal"`` (default): the mean over the sequence's tokens of :func:`balance_gain`, each token's
  first-order effect on the squared expert-usage cv of the *dataset* it joins (the samples accepted so far,
  the other samples' best beams and its own beam), standardized so that a uniformly random routing scores
  0 +- 1 at cv 1 for any expert count E and top-k. Negative for tokens routed to under-used experts.
* ``"sample"``: :func:`expert_usage_cv` of the candidate's own counts (MoEQuant's per-sequence balance);
* ``"dataset"``: the cv of the dataset the candidate joins, on the per-sample scale.

Sign convention: a lower B means a flatter expert load, which is what EBSS wants (every expert sees
calibration tokens), so B is *subtracted*; ``tau`` is a temperature: large ``tau`` = fluency only, small
``tau`` = balance dominates.

Relation to MoEQuant's sigma: MoEQuant scores ``std`` of the usage *fractions* (:func:`expert_balance_sigma`).
Since ``mean(count) = sum(count) / E``, ``cv = E * sigma`` exactly: the two rank candidates of one step
identically, but at a fixed ``tau`` sigma's weight shrinks like ``1/E``: a load collapsed onto k of the E
experts has ``sigma ~ 1/sqrt(E*k)`` but ``cv ~ sqrt(E/k)``, a balanced one 0 in both. The marginal gain is,
up to terms shared by all candidates, ``N E^2 / sd`` times the first-order change of ``sigma^2 / 2`` (``N``
dataset tokens, ``sd`` the random-routing std, see :func:`balance_gain`).

Why not the cv itself at large E (measured on skew-routed 64/128-expert models, ``benchmarks/results/
ebss_sweep.md``): one token moves the cv by the *mean* over its k experts, whose spread across candidates
shrinks like ``1/sqrt(k)`` (half at k=8 of that at k=2), and even with the balance term alone (tau -> 0),
4 candidates per beam did not go below ~0.8x the unguided cv at E=128. So the gain is standardized over k
and the default takes 2x more candidates. Its square-law objective (the MoE training load-balancing loss)
stops paying fluency for balance once a load is flat, which the cv does not (at E=8 the cv term bought
0.38x for -0.7 nats/token).
The default ``tau`` was chosen by measurement across expert counts 8-128 (``benchmarks/ebss_sweep.py``).

Finished samples are checked for degeneration (:func:`degeneracy`): a zlib compression ratio of the text
below ``min_compression`` ("repetitive"), or a tail of ``loop_window`` tokens that repeats with a period of at
most half that window ("loop"). Rejected samples are counted by reason and regenerated from new first tokens.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moeq.calib.expert_tokens import format_token_stats, layer_token_stats
from moeq.eval.routing import RouterTap

logger = logging.getLogger(__name__)


# Measured in benchmarks/results/ebss_sweep.md (2 seeds, marginal balance, 2x candidates): the more fluent of the
# two swept taus (0.3, 0.2) that cuts the dataset's usage CV to <= 0.8x the unguided beam samples at E = 16 and at
# every E >= 64 with <= 1/8 degenerate samples: 0.45x (E8) 0.64x (E16) 0.71x (E32) 0.77x / 0.72x (E64) 0.78x (E128),
# 0.49x on the trained demo model, at most 3% degenerate.
DEFAULT_TAU = 0.3
BALANCES = ("marginal", "dataset", "sample")
CANDIDATES_PER_BEAM = 2


@dataclass(frozen=True)
class EBSSConfig:
    """EBSS settings. ``candidates`` per beam defaults to ``CANDIDATES_PER_BEAM * beam``; ``batch`` samples are
    searched at once (``batch*beam*candidates`` rows per forward); ``max_attempts`` caps generated samples
    (default 4x)."""

    nsamples: int = 128
    seqlen: int = 256
    beam: int = 4
    candidates: int | None = None
    tau: float = DEFAULT_TAU
    balance: str = "marginal"
    temperature: float = 1.0
    batch: int = 8
    seed: int = 0
    min_compression: float = 0.2
    loop_window: int | None = None
    max_attempts: int | None = None

    @property
    def num_candidates(self) -> int:
        return self.candidates or CANDIDATES_PER_BEAM * self.beam

    def validate(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2 or self.beam < 1 or self.batch < 1:
            raise ValueError("ebss needs nsamples >= 1, seqlen >= 2, beam >= 1, batch >= 1")
        if self.candidates is not None and self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        if self.tau <= 0 or self.temperature <= 0:
            raise ValueError(f"tau and temperature must be > 0 (got tau={self.tau}, temperature={self.temperature})")


def expert_balance_sigma(counts: torch.Tensor) -> torch.Tensor:
    """Expert-balance term of EBSS.

    Args:
        counts: expert usage counts ``[..., n_moe_layers, E]`` (any numeric dtype).
    Returns float64 ``[...]``: the mean over layers of ``std(counts / counts.sum(-1), ddof=1)`` across the E
    experts (0 = perfectly balanced; a layer with no tokens counts as balanced).
    """
    c = counts.to(torch.float64)
    frac = c / c.sum(-1, keepdim=True).clamp_min(1.0)
    return frac.std(-1, correction=1).mean(-1)


def expert_usage_cv(counts: torch.Tensor) -> torch.Tensor:
    """Balance term of EBSS's score: coefficient of variation of expert usage, ``E *`` :func:`expert_balance_sigma`.

    Args:
        counts: expert usage counts ``[..., n_moe_layers, E]`` (any numeric dtype).
    Returns float64 ``[...]``: the mean over layers of ``std(counts, ddof=1) / mean(counts)`` across the E
    experts (0 = perfectly balanced; a layer with no tokens counts as balanced).
    """
    c = counts.to(torch.float64)
    return (c.std(-1, correction=1) / c.mean(-1).clamp_min(1e-12)).mean(-1)


def compression_ratio(text: str) -> float:
    """``len(zlib.compress(utf8, 9)) / len(utf8)``: ~0.5 for code, far lower for looping text."""
    raw = text.encode("utf-8", errors="replace")
    return len(zlib.compress(raw, 9)) / max(len(raw), 1)


def tail_period(ids: list[int], window: int) -> int:
    """Smallest period ``p <= window // 2`` with which the last ``window`` tokens repeat exactly, else 0."""
    if len(ids) < window:
        return 0
    tail = ids[-window:]
    for p in range(1, window // 2 + 1):
        if tail[p:] == tail[:-p]:
            return p
    return 0


def degeneracy(ids: list[int], text: str, min_compression: float = 0.2, loop_window: int | None = None) -> str | None:
    """Why a generated sample is degenerate (``"repetitive"`` or ``"loop"``), or None when it is kept.

    Thresholds were set on the stdlib text the demo model reads: 256-byte windows of real code compress to
    >= 0.227 (min over 4,273 held-out windows; a 32-byte loop compresses to 0.13), and a 64-token periodic tail
    occurs in < 0.03% of them (runs of one character such as ``####``).
    """
    if compression_ratio(text) < min_compression:
        return "repetitive"
    if tail_period(ids, loop_window or max(32, len(ids) // 4)):
        return "loop"
    return None


def _printable_first_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids that decode to a visible, non-blank string (random first tokens should look like text)."""
    if tokenizer is None:
        return torch.arange(vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ok = []
    for i in range(vocab_size):
        s = tokenizer.decode([i])
        if i not in special and s.strip() and s.isprintable() and "\ufffd" not in s:
            ok.append(i)
    if not ok:
        raise ValueError("the tokenizer decodes no token to printable text")
    return torch.tensor(ok)


@dataclass
class EBSSResult:
    """``samples``: dicts ``{"input_ids", "text", "mean_logprob", "sigma", "cv", "compression"}``; ``summary``:
    counts (requested / accepted / generated / rejected by reason), the dataset's expert counts, sigma and cv,
    per-layer calibration tokens per expert (``expert_tokens``, :func:`moeq.calib.expert_tokens.layer_token_stats`),
    settings."""

    samples: list[dict]
    summary: dict


def balance_gain(token: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Balance gain of one token (``"marginal"`` balance): how much it raises the dataset's squared usage cv.

    Args:
        token: the token's routing ``[..., layers, E]``, 1 for each of its top-k experts (any numeric dtype).
        reference: expert counts of the dataset the token joins ``[..., layers, E]`` (broadcast against ``token``).
    Returns float64 ``[...]``: the mean over layers of ``sum_{e in S} (c_e / mean(c) - 1) / sqrt(k (E - k) / E)``,
    ``S`` the token's ``k`` experts, ``c`` the reference counts (0 for a layer with an empty reference, or one the
    token did not reach). Negative = the token's experts are under-used: it balances.

    Derivation. The objective is ``cv^2 / 2`` per layer, ``cv = std(c, ddof=1) / mean(c)``:
    ``E * sum_e f_e^2 = 1 + (E - 1) / E * cv^2`` for usage fractions ``f``, so it is the load-balancing loss MoE
    models are trained with (Switch/GShard) up to constants, and ``cv^2 = E^2 sigma^2`` with MoEQuant's sigma
    (std of the fractions). With ``N`` dataset tokens, ``m = mean(c)`` and relative loads ``r_e = c_e / m - 1``,
    one token changes it by ``(E / (E - 1) * mean_{e in S} r_e - cv^2) / N`` to first order. Times ``N`` it is
    free of the dataset size; ``-cv^2`` is the same for every candidate and ``E / (E - 1)`` ~ 1, both dropped.
    ``mean_S r`` has std ``cv * sqrt((E - k) / (E k))`` over uniformly random k-subsets, which shrinks like
    ``1/sqrt(k)`` (measured: the cv term's spread across one step's candidates was half as large at E=64 k=8
    as at E=16 k=2, the log-prob's the same), so the gain is divided by that std at ``cv = 1``: a random token
    scores about 0 +- cv at any E and k. Unlike a cv penalty, whose gradient keeps its size down to cv = 0, the
    squared objective's gain shrinks with the imbalance left, so a model that is easy to balance does not keep
    buying balance with fluency.
    """
    c = reference.to(torch.float64)
    E = c.shape[-1]
    m = c.mean(-1, keepdim=True)
    r = torch.where(m > 0, c / m.clamp_min(1e-12) - 1.0, torch.zeros_like(c))
    t = token.to(torch.float64)
    k = t.sum(-1)
    norm = (k * (E - k) / E).sqrt()
    rsum = (t * r).sum(-1)
    return torch.where(norm > 0, rsum / norm.clamp_min(1e-12), torch.zeros_like(rsum)).mean(-1)


def _rest_of_dataset(beams: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """Counts of everything but sample g, ``[G, layers, E]``: the other samples' best beams (beam 0) plus
    ``prior`` (samples accepted before this batch), from ``beams [G, W, layers, E]`` and ``prior [layers, E]``."""
    best = beams[:, 0]
    others = best.sum(0, keepdim=True) - best
    return others + prior.to(others.device) if prior is not None else others


def _balance_term(cand: torch.Tensor, beams: torch.Tensor, prior: torch.Tensor | None, balance: str) -> torch.Tensor:
    """The balance each candidate is penalized by, float64 ``[G, W*K]``.

    Args:
        cand: usage counts of every candidate continuation ``[G, W*K, layers, E]`` (row ``w*K + j`` grows beam w).
        beams: counts of the beams they grow from ``[G, W, layers, E]`` (beam 0 = each sample's best so far).
        prior: counts of the samples accepted before this batch ``[layers, E]`` or None.
        balance: ``"sample"``: cv of the candidate's own counts (MoEQuant's per-sequence balance);
            ``"dataset"``: cv of the dataset the candidate would join (prior + the other samples' current best
            beams + the candidate), times ``total / own`` tokens, which puts the candidate's marginal effect on
            the dataset's cv back on the per-sample scale (the constant part is the same for every candidate
            of a sample, so it does not change the ranking) and keeps one ``tau`` meaning the same at any
            dataset size; ``"marginal"``: :func:`balance_gain` of the candidate's *last token* against the
            dataset it joins (prior + other samples' best beams + its parent beam); the search sums it over
            the sequence's tokens.
    """
    if balance == "sample":
        return expert_usage_cv(cand)
    others = _rest_of_dataset(beams, prior)
    if balance == "marginal":
        K = cand.shape[1] // beams.shape[1]
        parent = beams.repeat_interleave(K, dim=1)  # [G, W*K, layers, E]
        return balance_gain(cand - parent, parent + others[:, None])
    total = cand + others[:, None]
    scale = total.sum((-2, -1)).double() / cand.sum((-2, -1)).double().clamp_min(1.0)
    return expert_usage_cv(total) * scale


@torch.no_grad()
def _search(model: nn.Module, tap: RouterTap, first: torch.Tensor, cfg: EBSSConfig, gen: torch.Generator,
            prior: torch.Tensor | None = None) -> tuple:
    """Beam search for ``G = len(first)`` samples at once (``prior``: counts of the samples accepted so far,
    ``[layers, E]``, for the ``dataset`` balance).

    Returns ``tokens [G, L]`` int64, ``mean_logprob [G]``, ``sigma [G]`` (float64) and ``counts [G, layers, E]``
    of the best-scoring beam of each sample.
    """
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    G, W = first.numel(), cfg.beam
    K = cfg.num_candidates
    cache = DynamicCache()
    tokens = first.to(dev).repeat_interleave(W)[:, None]  # [G*W, 1]
    logits = model(input_ids=tokens, past_key_values=cache, use_cache=True).logits[:, -1].float()
    counts = tap.counts().to(dev)  # [G*W, layers, E]
    # the cache is kept at G*W*K rows (row = beam*K + candidate): one reorder per step picks the parents of the
    # next candidates directly, instead of shrinking to G*W and growing again
    cache.reorder_cache(torch.arange(G * W, device=dev).repeat_interleave(K))
    # only beam 0 of each sample is live at first, so the W beams do not start as W copies
    cum = torch.full((G, W), float("-inf"), dtype=torch.float64, device=dev)
    cum[:, 0] = 0.0
    cum_bal = torch.zeros((G, W), dtype=torch.float64, device=dev)  # summed balance_gain ("marginal")
    for step in range(1, cfg.seqlen):
        logp = torch.log_softmax(logits, dim=-1)  # [G*W, V]
        noise = -torch.log(-torch.log(torch.rand(logp.shape, generator=gen).clamp_(1e-20, 1.0)))
        cand = torch.topk(logp / cfg.temperature + noise.to(dev), K, dim=-1).indices  # [G*W, K]
        cand_lp = logp.gather(1, cand).double()
        logits = model(input_ids=cand.reshape(-1, 1), past_key_values=cache, use_cache=True).logits[:, -1].float()
        new_counts = counts.repeat_interleave(K, dim=0) + tap.counts().to(dev)  # [G*W*K, layers, E]
        new_cum = (cum.reshape(-1, 1) + cand_lp).reshape(G, W * K)
        bal = _balance_term(new_counts.reshape(G, W * K, *counts.shape[1:]), counts.reshape(G, W, *counts.shape[1:]),
                            prior, cfg.balance)
        if cfg.balance == "marginal":  # per-token gains: the sequence's term is their mean, like the log-prob's
            bal = (cum_bal.reshape(-1, 1) + bal.reshape(G * W, K)).reshape(G, W * K)
            new_bal, bal = bal, bal / step
        cand_score = new_cum / step - bal / cfg.tau  # -inf stays -inf for dead beams; tau=inf: fluency only
        _, sel = torch.topk(cand_score, W, dim=-1)  # [G, W], sorted best first
        keep = (sel + torch.arange(G, device=dev)[:, None] * (W * K)).reshape(-1)  # rows of the W*K batch
        if step + 1 < cfg.seqlen:
            cache.reorder_cache(keep.repeat_interleave(K))
        logits, counts = logits[keep], new_counts[keep]
        cum = new_cum.reshape(-1)[keep].reshape(G, W)
        if cfg.balance == "marginal":
            cum_bal = new_bal.reshape(-1)[keep].reshape(G, W)
        tokens = torch.cat([tokens[keep // K], cand.reshape(-1)[keep][:, None]], dim=1)
    best = torch.arange(G, device=dev) * W  # beam 0 = best score after the last topk
    mean_lp = cum[:, 0] / (cfg.seqlen - 1)
    return tokens[best].cpu(), mean_lp.cpu(), expert_balance_sigma(counts[best]).cpu(), counts[best].cpu()


@torch.no_grad()
def ebss_generate(model: nn.Module, tokenizer=None, config: EBSSConfig | None = None, progress: bool = True) -> EBSSResult:
    """Generate ``config.nsamples`` EBSS calibration sequences of ``config.seqlen`` tokens with ``model``.

    ``tokenizer`` (optional) decodes the ``text`` field, restricts first tokens to printable ones and feeds the
    compression check; without it the check runs on the ids rendered as text. Deterministic for a seed on a
    given device. Raises ``ValueError`` for bad settings.
    """
    cfg = config or EBSSConfig()
    cfg.validate()
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = int(model.config.vocab_size)
    firsts = _printable_first_tokens(tokenizer, vocab)
    max_attempts = cfg.max_attempts or 4 * cfg.nsamples
    samples, rejected, attempts = [], {"repetitive": 0, "loop": 0}, 0
    total_counts = None
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.nsamples, desc="ebss", unit="sample", disable=not progress)
    with RouterTap(model) as tap:
        while len(samples) < cfg.nsamples and attempts < max_attempts:
            g = min(cfg.batch, max_attempts - attempts, cfg.nsamples - len(samples))
            first = firsts[torch.randint(0, firsts.numel(), (g,), generator=gen)]
            toks, mlp, sig, cnt = _search(model, tap, first, cfg, gen, total_counts)
            attempts += g
            for j in range(g):
                ids = toks[j].tolist()
                text = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
                why = degeneracy(ids, text, cfg.min_compression, cfg.loop_window)
                if why is not None:
                    rejected[why] += 1
                    logger.debug("ebss: rejected a %s sample: %r", why, text[:80])
                    continue
                if len(samples) < cfg.nsamples:
                    samples.append({"input_ids": ids, "text": text, "mean_logprob": float(mlp[j]),
                                    "sigma": float(sig[j]), "cv": float(expert_usage_cv(cnt[j])),
                                    "compression": round(compression_ratio(text), 4)})
                    total_counts = cnt[j] if total_counts is None else total_counts + cnt[j]
                    bar.update(1)
            bar.set_postfix(rejected=sum(rejected.values()))
    bar.close()
    if len(samples) < cfg.nsamples:
        logger.warning("ebss: only %d of %d samples accepted after %d attempts (%s rejected)", len(samples),
                       cfg.nsamples, attempts, rejected)
    summary = {
        "method": "ebss", "requested": cfg.nsamples, "accepted": len(samples), "generated": attempts,
        "rejected": rejected, "rejected_total": sum(rejected.values()),
        "dataset_sigma": float(expert_balance_sigma(total_counts)) if total_counts is not None else None,
        "dataset_cv": float(expert_usage_cv(total_counts)) if total_counts is not None else None,
        "expert_counts": total_counts.tolist() if total_counts is not None else None,
        "expert_tokens": (layer_token_stats(total_counts, len(samples) * cfg.seqlen, tap.layers)
                          if total_counts is not None else None),
        "mean_logprob": sum(s["mean_logprob"] for s in samples) / max(len(samples), 1),
        "seconds": round(time.perf_counter() - t0, 2), "config": {**asdict(cfg), "candidates": cfg.num_candidates},
    }
    logger.info("ebss: %d samples accepted, %d generated, rejected %s; dataset cv %s, mean log-prob %.4f",
                len(samples), attempts, rejected, summary["dataset_cv"], summary["mean_logprob"])
    for st in summary["expert_tokens"] or []:
        logger.info("ebss: layer %d %s", st["layer"], format_token_stats(st))
    return EBSSResult(samples, summary)


def sidecar_path(path) -> Path:
    """Where :func:`write_jsonl` puts the summary: ``FILE.jsonl`` -> ``FILE.summary.json``."""
    return Path(path).with_suffix(".summary.json")


def write_jsonl(result: EBSSResult, path) -> Path:
    """One JSON object per sample (``input_ids``, ``text``, ``mean_logprob``, ``sigma``, ``compression``) in
    ``path``; the summary (rejection counts, dataset sigma, settings) in :func:`sidecar_path`, so every line of
    the JSONL is a sample any loader can read. Returns the sidecar's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar_path(path)
    # each file is written beside its destination and renamed over it: an interrupt never leaves a truncated one
    _replace_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.samples))
    _replace_text(side, json.dumps(result.summary, indent=1) + "\n")
    return side


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.moeq-tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
