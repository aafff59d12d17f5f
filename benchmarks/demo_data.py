"""Shared setup of the demo-model benchmark scripts: the model, its tokenizer, calibration windows and held-out
tokens from the deterministic CPython-stdlib splits (``moeq.calib.stdlib``)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeq.assets import demo_model_path
from moeq.calib.data import random_windows
from moeq.calib.stdlib import stdlib_text


def demo_setup(nsamples: int, seqlen: int, train_bytes: int = 400_000, heldout_bytes: int = 200_000):
    """``(model fp32 eval, tokenizer, calib [nsamples, seqlen] int64, held-out ids [N] int64)``."""
    torch.manual_seed(0)
    path = demo_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = random_windows(torch.tensor(tok(stdlib_text("train", max_bytes=train_bytes))["input_ids"]), nsamples,
                           seqlen, seed=0)
    held = torch.tensor(tok(stdlib_text("heldout", max_bytes=heldout_bytes))["input_ids"])
    return fp, tok, calib, held


def write_results(out: str, res: dict, markdown) -> None:
    """``<out>.json`` (the measured record) and ``<out>.md`` (``markdown(res)``), also printed."""
    import json
    from pathlib import Path

    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    p.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
