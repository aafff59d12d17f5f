"""Perplexity with the GPTQ-paper convention: join the text, cut non-overlapping windows of ``seqlen``
tokens, ``exp(mean token NLL)`` over all predicted tokens."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def windows(ids: torch.Tensor, seqlen: int) -> list[torch.Tensor]:
    """Non-overlapping ``[seqlen]`` windows of a 1-D token tensor (the ragged tail is dropped, as GPTQ does)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, batch_size: int = 1, max_windows: int | None = None) -> dict:
    """Perplexity of ``model`` on token ids ``[N]`` (int64).

    Returns ``{"ppl", "nll", "tokens", "windows"}``; ``tokens`` counts predicted tokens (``seqlen - 1`` per window).
    """
    wins = windows(ids, seqlen)[:max_windows]
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    for i in tqdm(range(0, len(wins), batch_size), desc="perplexity", unit="batch"):
        batch = torch.stack(wins[i : i + batch_size]).to(device)
        logits = model(batch).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll_sum += float(loss)
        count += batch[:, 1:].numel()
    nll = nll_sum / count
    logger.info("perplexity over %d windows of %d tokens (%d predicted): %.4f", len(wins), seqlen, count, math.exp(nll))
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(wins)}
