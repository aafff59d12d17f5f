"""Train the shipped demo model: a small byte-level Qwen2-MoE code model on CPython's stdlib source.

    python benchmarks/train_demo_model.py                 # writes moeq/assets/demo-moe/ (about 5 min, 2 cores)

Model: Qwen2-MoE, 4 layers, hidden 128, 4 heads, 8 routed experts top-2 (moe_intermediate_size 128), one shared
expert (256) with its sigmoid gate in every layer; vocabulary = the 256-id byte tokenizer of
:func:`moeq.testing.tiny_tokenizer` (no special tokens). Every linear / expert input dim is 128 or 256, so W4/W3
g128 apply everywhere. Training: random windows of the ``train`` split of :mod:`moeq.calib.stdlib`, AdamW with
warm-up and cosine decay, the transformers load-balancing auxiliary loss (so experts are used), a fixed number of
steps and a fixed seed (deterministic on a given machine / torch build). At the end it measures the held-out
perplexity and the expert load on the ``heldout`` split and writes ``training.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeq.calib.stdlib import stdlib_text  # noqa: E402
from moeq.eval.perplexity import perplexity  # noqa: E402
from moeq.eval.routing import expert_counts  # noqa: E402
from moeq.testing import tiny_tokenizer  # noqa: E402

DEFAULT_OUT = ROOT / "moeq" / "assets" / "demo-moe"

MODEL_CONFIG = dict(
    vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=8,
    num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
    max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False, router_aux_loss_coef=0.01,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def build_model(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("qwen2_moe", **MODEL_CONFIG)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    tok = tiny_tokenizer()
    t0 = time.perf_counter()
    train_ids = torch.tensor(tok(stdlib_text("train", max_bytes=args.train_bytes))["input_ids"], dtype=torch.long)
    held_ids = torch.tensor(tok(stdlib_text("heldout", max_bytes=args.eval_bytes))["input_ids"], dtype=torch.long)
    print(f"data: {train_ids.numel():,} train tokens, {held_ids.numel():,} held-out tokens "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)

    model = build_model(args.seed).to(args.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    t_train = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.seqlen, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seqlen] for s in starts.tolist()]).to(args.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = float(out.aux_loss.detach())
        lm = float(out.loss.detach()) - MODEL_CONFIG["router_aux_loss_coef"] * aux
        history.append(lm)
        if step % 25 == 0 or step == args.steps - 1:
            el = time.perf_counter() - t_train
            print(f"step {step:4d}/{args.steps}  lm loss {lm:.4f}  aux {aux:.4f}  "
                  f"{(step + 1) * x.numel() / el:,.0f} tok/s  {el:.0f}s", flush=True)
    train_s = time.perf_counter() - t_train

    model.eval()
    with torch.no_grad():
        ppl = perplexity(model, held_ids, args.seqlen, batch_size=8)
        load = expert_counts(model, held_ids, args.seqlen)
    tail = history[-max(args.steps // 20, 1):]
    record = {
        "model_config": MODEL_CONFIG, "parameters": n_params,
        "data": {"train": f"moeq.calib.stdlib_text('train', max_bytes={args.train_bytes})",
                 "heldout": f"moeq.calib.stdlib_text('heldout', max_bytes={args.eval_bytes})",
                 "train_tokens_available": train_ids.numel(), "python": platform.python_version()},
        "training": {"steps": args.steps, "batch": args.batch, "seqlen": args.seqlen, "lr": args.lr,
                     "warmup": args.warmup, "seed": args.seed, "threads": args.threads,
                     "tokens_seen": args.steps * args.batch * args.seqlen, "seconds": round(train_s, 1),
                     "torch": torch.__version__, "machine": platform.machine()},
        "train_loss_first": round(history[0], 4),
        "train_loss_final": round(sum(tail) / len(tail), 4),
        "train_loss_curve": [round(sum(history[i : i + 25]) / len(history[i : i + 25]), 4)
                             for i in range(0, len(history), 25)],
        "heldout": {"ppl": round(ppl["ppl"], 4), "nll": round(ppl["nll"], 4), "tokens": ppl["tokens"],
                    "seqlen": args.seqlen},
        "expert_load": {"tokens": int(held_ids.numel() // args.seqlen * args.seqlen),
                        "counts": load.tolist()},
    }
    return model, tok, record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-bytes", type=int, default=4_000_000)
    ap.add_argument("--eval-bytes", type=int, default=65_536)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    model, tok, record = train(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to("cpu").save_pretrained(out)
    tok.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"saved to {out} ({size:.2f} MiB); held-out ppl {record['heldout']['ppl']:.3f}, "
          f"final train loss {record['train_loss_final']:.4f}, {record['training']['seconds']:.0f}s training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
