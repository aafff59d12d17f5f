"""Files shipped inside the package: the trained demo MoE model.

``demo-moe/`` is a small byte-level Qwen2-MoE code model (4 layers, hidden 128, 8 routed experts top-2 of
intermediate 128, one shared expert of 256 with its sigmoid gate) trained by ``benchmarks/train_demo_model.py``
on CPython's standard-library source (:mod:`moeq.calib.stdlib`). Its ``training.json`` records how it was
trained and what it measured (loss, held-out perplexity, expert load).
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo-moe"


def demo_model_path() -> Path:
    """Directory of the shipped demo model (Hugging Face format: ``config.json``, ``model.safetensors``,
    tokenizer files), loadable offline with ``AutoModelForCausalLM.from_pretrained``."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"demo model not found at {DEMO_MODEL_DIR}; run benchmarks/train_demo_model.py")
    return DEMO_MODEL_DIR


def demo_training_record() -> dict:
    """The demo model's ``training.json`` (hyper-parameters, losses, held-out perplexity, expert load)."""
    return json.loads((demo_model_path() / "training.json").read_text())
