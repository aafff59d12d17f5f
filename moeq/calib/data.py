"""Calibration and evaluation data: tokenize a local text file and cut token windows, or read token-id samples
from a JSONL file (``moeq calibrate`` output)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def tokenize_file(tokenizer, path: str | Path) -> torch.Tensor:
    """All of a text file's tokens as one int64 ``[N]`` tensor."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{p} is empty")
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows ``[nsamples, seqlen]`` at seeded random offsets of a 1-D token tensor (the GPTQ
    calibration convention)."""
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, need more than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def is_jsonl(path: str | Path) -> bool:
    """Whether a calibration file is a JSONL of token ids (by its ``.jsonl`` suffix) rather than text."""
    return Path(path).suffix.lower() == ".jsonl"


def load_jsonl(path: str | Path, seqlen: int, nsamples: int | None = None, pad_id: int = 0) -> dict:
    """Token-id calibration samples from a JSONL file (one ``{"input_ids": [...], ...}`` object per line, as
    ``moeq calibrate`` writes them).

    Each sample is truncated or right-padded to ``seqlen``; padding is marked 0 in the mask (``pad_id`` is
    only a placeholder: masked positions never reach a Hessian). The first ``nsamples`` lines are used (all
    when None or when the file has fewer; fewer is logged).
    Returns ``{"input_ids": int64 [n, seqlen], "attention_mask": int64 [n, seqlen]}``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file not found: {p}")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ids = json.loads(line)["input_ids"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{p}:{lineno}: expected a JSON object with 'input_ids' ({exc})") from exc
            if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise ValueError(f"{p}:{lineno}: 'input_ids' must be a non-empty list of non-negative ints")
            rows.append(ids[:seqlen])
            if nsamples is not None and len(rows) == nsamples:
                break
    if not rows:
        raise ValueError(f"{p} has no samples")
    if nsamples is not None and len(rows) < nsamples:
        logger.warning("%s has %d samples, fewer than nsamples=%d; using all of them", p, len(rows), nsamples)
    ids = torch.full((len(rows), seqlen), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seqlen), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def load_calibration(tokenizer, path: str | Path, nsamples: int, seqlen: int, seed: int = 0):
    """Calibration data for ``quantize_model`` from a file: a ``.jsonl`` of token ids (:func:`load_jsonl`, a
    dict with an attention mask; no tokenizer needed) or a text file (:func:`random_windows`, int64
    ``[nsamples, seqlen]``)."""
    if is_jsonl(path):
        return load_jsonl(path, seqlen, nsamples)
    return random_windows(tokenize_file(tokenizer, path), nsamples, seqlen, seed)
