"""benchmarks/gptq_speed.py's perplexity: finite, overflowing and non-finite models are reported, never a crash."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gptq_speed import perplexity  # noqa: E402


class _Fixed(torch.nn.Module):
    """Logits ``[1, T, V]`` = ``scale`` on id 0 and 0 elsewhere (optionally NaN in window ``nan_window``)."""

    def __init__(self, vocab: int, scale: float, nan_window: int | None = None):
        super().__init__()
        self.vocab, self.scale, self.nan_window, self.calls = vocab, scale, nan_window, 0

    def forward(self, input_ids):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[..., 0] = self.scale
        if self.calls == self.nan_window:
            logits[0, 3, 1] = float("nan")
        self.calls += 1
        return SimpleNamespace(logits=logits)


def test_uniform_logits_give_the_vocabulary_size():
    ids = torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(0))
    r = perplexity(_Fixed(16, 0.0), ids, 16)
    assert math.isclose(r["ppl"], 16.0, rel_tol=1e-5) and r["nonfinite_windows"] == 0


def test_overflowing_nll_is_inf_not_an_error():
    # targets never id 0 while id 0 gets logit 1e4: NLL ~ 1e4 per token, exp overflows a float
    ids = torch.ones(64, dtype=torch.long)
    r = perplexity(_Fixed(16, 1e4), ids, 16)
    assert r["ppl"] == float("inf") and r["nonfinite_windows"] == 0


def test_nonfinite_logits_are_counted():
    ids = torch.ones(64, dtype=torch.long)
    r = perplexity(_Fixed(16, 0.0, nan_window=2), ids, 16)
    assert math.isnan(r["ppl"]) and r["nonfinite_windows"] == 1
