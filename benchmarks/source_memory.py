"""Peak memory of ``SourceCheckpoint.load_module`` for one decoder layer vs that layer's size (and vs a full
``from_pretrained``), each measured in a fresh process from its peak RSS.

    python benchmarks/source_memory.py --out /tmp/srcmem            # writes the checkpoint once, then measures
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    """VmHWM: the peak resident set since the last :func:`_reset_peak`."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so imports and the meta-model
    # build do not hide the peak of what is measured
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write(path: Path, layers: int, experts: int) -> None:
    from moeq.testing import tiny_model

    model = tiny_model("qwen3_moe", hidden_size=512, moe_intermediate_size=256, num_experts=experts,
                       num_hidden_layers=layers, head_dim=64, num_attention_heads=8, num_key_value_heads=4)
    model.save_pretrained(path, max_shard_size="64MB")


def measure(path: Path, what: str, layer: int) -> dict:
    from moeq.io.source import SourceCheckpoint

    sc = SourceCheckpoint(path)
    meta = sc.build_meta_model(torch.float32)
    _reset_peak()
    before_rss, before_peak = _rss_mib(), _peak_mib()
    t0 = time.perf_counter()
    if what == "layer":
        got = sc.load_module(f"model.layers.{layer}", meta)
        held = sum(t.numel() * t.element_size() for t in got.values()) / 2**20
        extra = {"bytes_read_mib": sc.last_bytes_read / 2**20}
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        held = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
        extra = {}
    seconds = time.perf_counter() - t0
    return {"what": what, "seconds": round(seconds, 2), "tensors_mib": round(held, 1), "peak_rss_increase_mib": round(_peak_mib() - before_peak, 1),
            "rss_before_mib": round(before_rss, 1), **{k: round(v, 1) for k, v in extra.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--measure", choices=["layer", "full"])
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.out, args.measure, args.layer)))
        return
    if not (args.out / "config.json").is_file():
        write(args.out, args.layers, args.experts)
    disk = sum(p.stat().st_size for p in args.out.glob("*.safetensors")) / 2**20
    print(json.dumps({"checkpoint_mib": round(disk, 1), "shards": len(list(args.out.glob("*.safetensors")))}))
    for what in ("layer", "full"):
        cmd = [sys.executable, __file__, "--out", str(args.out), "--layer", str(args.layer), "--measure", what]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
