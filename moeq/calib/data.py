"""Calibration and evaluation text: tokenize a local file, cut token windows."""

from __future__ import annotations

from pathlib import Path

import torch


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
