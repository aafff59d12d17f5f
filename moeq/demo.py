"""``moeq demo``: quantize the shipped trained demo MoE end to end and check the result.

The demo model (:func:`moeq.assets.demo_model_path`) is a small byte-level Qwen2-MoE code model (shared expert
+ sigmoid gate in every layer) trained on CPython's standard-library source. The demo runs the path a user runs
on a real checkpoint: load -> RTN W4 g128 -> save -> ``moeq info`` -> ``load_quantized`` -> logits vs. a
fake-quant reference -> held-out perplexity before/after -> ``generate``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

import moeq
from moeq.assets import demo_model_path
from moeq.io.info import checkpoint_info, tensor_bytes

PROMPT = "def read_config(path):\n    "


def run_demo(out_dir: str | Path, device: str = "cpu", overwrite: bool = False) -> list[str]:
    """Run the demo, returning the report lines (``overwrite`` replaces an earlier run's checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeq.calib.stdlib import stdlib_text
    from moeq.eval.perplexity import perplexity

    out = Path(out_dir)
    q_dir = out / "w4g128"
    src = demo_model_path()
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    n_params = sum(p.numel() for p in fp.parameters())
    lines = [f"loaded the trained demo model ({fp.config.model_type}, {n_params:,} params) from {src}"]

    model = copy.deepcopy(fp).to(device)
    t0 = time.perf_counter()
    report = moeq.quantize_model(model, moeq.QuantConfig(method="rtn", bits=4, group_size=128))
    moeq.save_quantized(model, q_dir, tokenizer=tok, overwrite=overwrite)
    worst = max(report.modules, key=lambda m: m.rel_error)
    lines.append(f"RTN w4 g128: {len(report.modules)} expert stacks in {time.perf_counter() - t0:.2f}s, "
                 f"worst rel. weight error {worst.rel_error:.4f} ({worst.name})")
    lines += checkpoint_info(q_dir).lines()

    loaded = moeq.load_quantized(q_dir, device=device)
    ref = _fake_quant_reference(fp, loaded).to(device)
    ids = torch.randint(0, fp.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a, b, c = loaded(ids).logits, ref(ids).logits, fp.to(device)(ids).logits
    lines.append(f"logits: quantized vs fake-quant max |diff| {float((a - b).abs().max()):.2e}; "
                 f"vs full precision {float((a - c).abs().max()):.3f} (max |logit| {float(c.abs().max()):.3f})")
    lines.append(f"resident tensor bytes: full precision {tensor_bytes(fp) / 2**20:.2f} MiB, "
                 f"quantized {tensor_bytes(loaded) / 2**20:.2f} MiB")
    # a small held-out slice keeps the demo quick; benchmarks/demo_quality.py measures properly
    held = torch.tensor(tok(stdlib_text("heldout", max_bytes=4 * 256))["input_ids"])
    p_fp = perplexity(fp, held, 256)["ppl"]
    p_q = perplexity(loaded, held, 256)["ppl"]
    lines.append(f"held-out perplexity (stdlib code, {held.numel()} tokens): full precision {p_fp:.3f}, "
                 f"RTN w4 g128 {p_q:.3f}")
    prompt = tok(PROMPT, return_tensors="pt")["input_ids"].to(device)
    gen = loaded.generate(prompt, max_new_tokens=48, do_sample=False)
    lines.append(f"generate: {tok.decode(gen[0])!r}")
    return lines


def _fake_quant_reference(fp: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``fp`` whose expert weights are the dequantized weights of ``quantized``."""
    ref = copy.deepcopy(fp)
    adapter = moeq.adapter_for(ref)
    qblocks = dict(moeq.adapter_for(quantized).moe_layers(quantized))
    with torch.no_grad():
        for idx, block in adapter.moe_layers(ref):
            ex = adapter.experts(block)
            w13, w2 = adapter.experts(qblocks[idx]).dequantized(ex.gate_up_proj.dtype)
            ex.gate_up_proj.copy_(w13)
            ex.down_proj.copy_(w2)
    return ref
