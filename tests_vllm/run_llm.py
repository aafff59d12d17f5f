"""Run one ``vllm.LLM`` in a fresh process and print its greedy tokens as one JSON line (prefix ``RESULT ``).

Used by the parallelism tests, which need vLLM's multi-process executor (one worker per rank; the engine spawns
them, hence the ``__main__`` guard)::

    python tests_vllm/run_llm.py CHECKPOINT --tp 2 [--ep] --prompts '[[...], ...]' --max-tokens 8
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", action="store_true", help="enable expert parallelism")
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", max_model_len=256, max_num_seqs=4, enforce_eager=True, seed=0,
              tensor_parallel_size=args.tp, enable_expert_parallel=args.ep,
              distributed_executor_backend="mp" if args.tp > 1 else "uni")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": t} for t in json.loads(args.prompts)], params, use_tqdm=False)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
