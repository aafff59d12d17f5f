"""Main-environment half of the vLLM CI step: quantize the demo model into the checkpoints the vLLM tests
serve, then record transformers + moeq's greedy tokens and prompt logprobs for them in one JSON file.

Runs in the MAIN environment (transformers >= 5, moeq installed), never in the vLLM virtualenv:

    python tests_vllm/make_reference.py --out WORKDIR

Writes ``WORKDIR/<name>/`` (one checkpoint per entry of :data:`CHECKPOINTS`, made with ``python -m moeq
quantize`` exactly as a user would), ``WORKDIR/calib.txt`` and ``WORKDIR/reference.json``::

    {"prompts": [[int, ...], ...],                 # token ids of PROMPTS (byte-level tokenizer)
     "max_tokens": 32,
     "checkpoints": {name: {"path": str, "greedy": [[int] * 32, ...],
                            "prompt_logprobs": [[float] * (len(prompt) - 1), ...]}}}

``prompt_logprobs[i][j]`` is log p(prompt[j + 1] | prompt[: j + 1]) in float32, the value vLLM reports for
prompt position j + 1 (position 0 has none).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("make_reference")

PROMPTS = [
    "def read_config(path):\n    ",
    "import os\nimport sys\n\n\nclass ",
    "    for key, value in sorted(",
    "# Copyright 2001 Python Software Foundation\n\"\"\"",
    "        if not isinstance(name, str):\n            raise ",
]
MAX_TOKENS = 32

# name -> extra ``moeq quantize`` arguments. Group size 64 keeps every intermediate split of TP=2
# (128 / 2 = 64) on a group boundary; mixed is asymmetric so qzeros travel through the loader too.
CHECKPOINTS = {
    "rtn": ["--method", "rtn", "--group-size", "64", "--quantize-linears", "attention", "shared_experts"],
    "gptq_rotate": ["--method", "gptq", "--rotate", "--calib", "{calib}", "--nsamples", "8", "--seqlen", "64"],
    "mixed": ["--method", "rtn", "--asym", "--mixed-budget", "3.0", "--mixed-levels", "2", "4",
              "--mixed-score", "outlier", "--mixed-granularity", "expert"],
}


def quantize_all(out: Path, names: list[str]) -> dict[str, Path]:
    """Run ``python -m moeq quantize`` for each named checkpoint (fp32 model weights, 16-bit scales)."""
    from moeq import demo_model_path
    from moeq.calib.stdlib import stdlib_text

    calib = out / "calib.txt"
    calib.write_text(stdlib_text("train", max_bytes=64_000), encoding="utf-8")
    paths = {}
    for name in names:
        dst = out / name
        args = [a.replace("{calib}", str(calib)) for a in CHECKPOINTS[name]]
        cmd = [sys.executable, "-m", "moeq", "quantize", "--model", str(demo_model_path()), "--dtype", "float32",
               "--out", str(dst), *args]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        logger.info("quantized %s in %.1f s", name, time.perf_counter() - t0)
        paths[name] = dst
    return paths


@torch.no_grad()
def reference_for(path: Path, prompts: list[list[int]]) -> dict:
    """Greedy continuations (``MAX_TOKENS`` each) and prompt logprobs of ``prompts`` under transformers + moeq."""
    import moeq

    model = moeq.load_quantized(path, dtype=torch.float32)
    greedy, prompt_lp = [], []
    for ids in prompts:
        x = torch.tensor([ids])
        logits = model(x).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        prompt_lp.append([lp[j, ids[j + 1]].item() for j in range(len(ids) - 1)])
        gen = model.generate(x, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        greedy.append(gen[0, len(ids):].tolist())
    return {"path": str(path), "greedy": greedy, "prompt_logprobs": prompt_lp}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="work directory for the checkpoints and reference.json")
    p.add_argument("--only", nargs="*", choices=sorted(CHECKPOINTS), default=sorted(CHECKPOINTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from transformers import AutoTokenizer

    from moeq import demo_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(demo_model_path())
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    paths = quantize_all(out, args.only)
    ref = {"prompts": prompts, "prompt_texts": PROMPTS, "max_tokens": MAX_TOKENS,
           "checkpoints": {n: reference_for(p_, prompts) for n, p_ in paths.items()}}
    (out / "reference.json").write_text(json.dumps(ref, indent=1))
    logger.info("wrote %s", out / "reference.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
