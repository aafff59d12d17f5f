"""Peak host memory of ``moeq quantize`` (the streaming pipeline) vs the size of the checkpoint it reads.

Generates a random checkpoint with real layer shapes (default Qwen3-30B-A3B: 128 experts x 768, hidden 2048,
GQA 32/4, vocabulary 151936; a few layers), stored per expert like a hub checkpoint, one shard per layer
(bf16; never committed), then runs ``moeq quantize`` on it in a child process under ``/usr/bin/time -v``
and reads its maximum resident set size.

    python benchmarks/stream_memory.py --dir /tmp/streammem --layers 8 --method rtn --no-clip
    python benchmarks/stream_memory.py --dir /tmp/streammem-gptq --layers 6 --hidden 1024 --experts 32 \\
        --inter 512 --vocab 32000 --method gptq --nsamples 16 --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import git_commit  # noqa: E402
from benchmarks.shapes import get_shape  # noqa: E402


def _config(args):
    over = {}
    if args.hidden:
        over.update(hidden_size=args.hidden, num_attention_heads=args.hidden // 128, num_key_value_heads=2)
    if args.experts:
        over.update(num_experts=args.experts)
    if args.inter:
        over.update(moe_intermediate_size=args.inter)
    if args.vocab:
        over.update(vocab_size=args.vocab)
    cfg = get_shape(args.shape).config(num_layers=args.layers, **over)
    cfg.dtype = "bfloat16"
    return cfg


def _hub_tensors(shapes: dict, prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random bf16 tensors of one module prefix in the hub layout (fused experts split per expert)."""
    out = {}
    for name, shape in shapes.items():
        if not (name == prefix or name.startswith(prefix + ".")):
            continue
        if name.endswith("experts.gate_up_proj"):
            mod = name.rpartition(".")[0]
            e, two_i, h = shape
            for x in range(e):
                w = torch.randn(two_i, h, generator=gen).mul_(0.02).to(torch.bfloat16)
                out[f"{mod}.{x}.gate_proj.weight"], out[f"{mod}.{x}.up_proj.weight"] = w[: two_i // 2].clone(), w[two_i // 2 :].clone()
        elif name.endswith("experts.down_proj"):
            mod = name.rpartition(".")[0]
            for x in range(shape[0]):
                out[f"{mod}.{x}.down_proj.weight"] = torch.randn(*shape[1:], generator=gen).mul_(0.02).to(torch.bfloat16)
        elif len(shape) == 1:
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            out[name] = torch.randn(*shape, generator=gen).mul_(0.02).to(torch.bfloat16)
    return out


def write_checkpoint(path: Path, cfg) -> int:
    """Write the checkpoint (one shard per layer + one for the rest); returns its tensor bytes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    prefixes = [f"model.layers.{i}" for i in range(cfg.num_hidden_layers)] + ["model.embed_tokens", "model.norm", "lm_head"]
    wmap, total = {}, 0
    for j, prefix in enumerate(prefixes):
        tensors = _hub_tensors(shapes, prefix, gen)
        fname = f"model-{j + 1:05d}-of-{len(prefixes):05d}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        wmap.update({k: fname for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    cfg.save_pretrained(path)
    return total


def _calib_file(path: Path, nsamples: int, seqlen: int, vocab: int) -> Path:
    """A .jsonl of random token ids (the format ``moeq calibrate`` writes)."""
    gen = torch.Generator().manual_seed(1)
    f = path / "calib.jsonl"
    with open(f, "w") as fh:
        for _ in range(nsamples):
            fh.write(json.dumps({"input_ids": torch.randint(0, vocab, (seqlen,), generator=gen).tolist()}) + "\n")
    return f


def import_baseline_bytes() -> int:
    """Peak RSS of a process that only imports what ``moeq quantize`` imports (torch, transformers, triton,
    moeq and the model's modeling file): the fixed part of every measurement."""
    code = "import moeq.cli, moeq.pipeline, moeq_kernels.ops, transformers; from transformers import AutoModelForCausalLM"
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024


def measure(args, src: Path, size: int) -> dict:
    out = src.parent / (src.name + "-q")
    cmd = [sys.executable, "-m", "moeq", "quantize", "--model", str(src), "--out", str(out), "--overwrite",
           "--method", args.method, "--restart"]
    if args.no_clip:
        cmd.append("--no-clip")
    if args.hessian_mib is not None:
        cmd += ["--hessian-mib", str(args.hessian_mib)]
    if args.method != "rtn":
        cmd += ["--calib", str(_calib_file(src.parent, args.nsamples, args.seqlen, 1000)), "--nsamples",
                str(args.nsamples), "--seqlen", str(args.seqlen)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"moeq quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    acts = args.nsamples * args.seqlen * _config(args).hidden_size * 2 if args.method != "rtn" else 0
    return {"checkpoint_bytes": size, "peak_rss_bytes": peak_kib * 1024, "ratio": peak_kib * 1024 / size,
            "import_baseline_bytes": import_baseline_bytes(),
            "calibration_activation_bytes": acts, "output_bytes": out_bytes, "wall_s": wall, "command": " ".join(cmd[1:]),
            "threads": env.get("OMP_NUM_THREADS"), "load_avg_start_end": [load_start, os.getloadavg()],
            **({"note": args.note} if args.note else {})}


def markdown(rows: list[dict]) -> str:
    """The results table of measured rows (one per run)."""
    lines = ["# Streaming quantization: peak host memory vs checkpoint size", "",
             "`moeq quantize` on generated checkpoints with real layer shapes (random bf16 weights, stored per expert "
             "like a hub checkpoint, one shard per layer), peak RSS of the process from `/usr/bin/time -v` "
             "(includes ~0.6 GB of torch/transformers/triton imports). Made by `benchmarks/stream_memory.py`.", "",
             "| date | commit | checkpoint | method | calibration | checkpoint GiB | peak RSS GiB | ratio | "
             "peak above imports GiB | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        real = r["hidden"] == 2048 and r["experts"] == 128
        vocab = f", V {r['vocab']}" if "vocab" in r else ""  # rows before 2026-12-03 did not record it
        shape = (f"{r['shape']} {'dims' if real else 'structure'}, H {r['hidden']}, E {r['experts']}{vocab}, "
                 f"{r['layers']} layers")
        cal = f"{r['nsamples']} x {r['seqlen']} ({r['calibration_activation_bytes'] / 2**20:.0f} MiB of activations)" \
            if r["nsamples"] else "-"
        method = r["method"] + ("" if r["clip"] else ", no clip")
        above = f"{(r['peak_rss_bytes'] - r['import_baseline_bytes']) / 2**30:.2f}" if "import_baseline_bytes" in r else "-"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['date']} | {r['commit'][:12]} | {shape} | {method}{note} | {cal} | "
                     f"{r['checkpoint_bytes'] / 2**30:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['ratio']:.3f} | "
                     f"{above} | {r['wall_s']:.0f} |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="scratch directory (the generated checkpoint goes here)")
    ap.add_argument("--shape", default="Qwen3-30B-A3B")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--inter", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq", "agq"])
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the quantize process")
    ap.add_argument("--hessian-mib", type=int, default=None, help="passed to moeq quantize (default: its own)")
    ap.add_argument("--note", default=None, help="recorded with the row (what differs from the defaults)")
    ap.add_argument("--results", type=Path, default=None, help="append the row to this JSON list")
    ap.add_argument("--markdown", type=Path, default=None, help="only write the table of --results to this file")
    args = ap.parse_args(argv)
    if args.markdown is not None:
        args.markdown.write_text(markdown(json.loads(args.results.read_text())))
        return 0
    if args.dir is None:
        ap.error("--dir is required to generate and measure a checkpoint")
    src = args.dir / "src"
    t0 = time.perf_counter()
    size = write_checkpoint(src, _config(args))
    print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
    row = {"shape": args.shape, "layers": args.layers, "hidden": _config(args).hidden_size,
           "experts": _config(args).num_experts, "vocab": _config(args).vocab_size, "method": args.method,
           "clip": not args.no_clip,
           "nsamples": args.nsamples if args.method != "rtn" else 0, "seqlen": args.seqlen if args.method != "rtn" else 0,
           **measure(args, src, size), "commit": git_commit(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row, indent=1))
    if args.results is not None:
        rows = json.loads(args.results.read_text()) if args.results.is_file() else []
        args.results.write_text(json.dumps(rows + [row], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
