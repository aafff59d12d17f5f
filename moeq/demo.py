"""``moeq demo``: quantize a tiny MoE model end to end and check the result.

Until the trained demo model ships, the demo builds a tiny Qwen2-MoE (shared expert + sigmoid gate, every
layer MoE) from a real transformers config with a fixed seed, writes it as a Hugging Face checkpoint, and
runs the same path a user runs on a real checkpoint: load -> RTN W4 g32 -> save -> ``moeq info`` ->
``load_quantized`` -> logits vs. a fake-quant reference -> ``generate``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

import moeq
from moeq.io.info import checkpoint_info, tensor_bytes
from moeq.testing import tiny_model


def run_demo(out_dir: str | Path, device: str = "cpu") -> list[str]:
    """Run the demo, returning the report lines."""
    out = Path(out_dir)
    fp_dir, q_dir = out / "fp", out / "w4g32"
    fp = tiny_model("qwen2_moe", seed=0)
    fp.save_pretrained(fp_dir)
    lines = [f"built tiny qwen2_moe from a real config ({sum(p.numel() for p in fp.parameters()):,} params) -> {fp_dir}"]

    model = copy.deepcopy(fp).to(device)
    t0 = time.perf_counter()
    report = moeq.quantize_model(model, moeq.QuantConfig(method="rtn", bits=4, group_size=32))
    moeq.save_quantized(model, q_dir)
    worst = max(report.modules, key=lambda m: m.rel_error)
    lines.append(f"RTN w4 g32: {len(report.modules)} expert stacks in {time.perf_counter() - t0:.2f}s, "
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
    gen = loaded.generate(ids[:1, :4], max_new_tokens=8, do_sample=False)
    lines.append(f"generate: {gen[0].tolist()}")
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
