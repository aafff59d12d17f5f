"""A real-size transformers MoE model with random packed INT4 experts, built without dense expert weights.

:func:`random_quantized_model` is what ``benchmarks/model_bench.py`` benchmarks: the model skeleton is built
with every parameter on the meta device (``moeq.io.load.params_on_meta``), each routed-experts module is
replaced by an empty :class:`moeq.nn.experts.QuantizedExperts` on the target device whose packed buffers are
then filled with random codes and scales in place, and every remaining meta parameter (attention, norms,
routers, shared experts, embeddings) gets random values directly on the device. Peak memory is therefore
the quantized model's size plus one expert's packed temporary: Mixtral-8x7B (93 GB in bf16) fits in ~25 GB.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from benchmarks.bench_common import fill_random_packed_
from moeq.config import WeightSpec
from moeq.io.load import params_on_meta
from moeq.models import adapter_for
from moeq.nn.experts import QuantizedExperts

logger = logging.getLogger("moeq.benchmarks.random_model")


def _init_like(name: str, p: nn.Parameter, device, std: float) -> nn.Parameter:
    """A random real tensor for a meta parameter: 1-D norm weights 1 (0 for biases), matrices ``N(0, std)``.

    Ones for norms keep activations O(1) through dozens of layers; zero-mean small weights elsewhere give
    non-degenerate routing and finite logits without any real checkpoint.
    """
    t = torch.empty(p.shape, dtype=p.dtype, device=device)
    if p.dim() <= 1:
        t.fill_(0.0 if "bias" in name else 1.0)
    else:
        t.normal_(0.0, std)
    return nn.Parameter(t, requires_grad=False)


def random_quantized_model(config: PretrainedConfig, spec: WeightSpec = WeightSpec(4, 128, True),
                           device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16,
                           backend: str = "auto", online_hadamard: bool = False, seed: int = 0) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` with random ``QuantizedExperts`` (eval mode, on ``device``).

    Args:
        config: a transformers config of a family moeq supports (``moeq.models``).
        spec: packing of both expert projections (default INT4, group 128, symmetric).
        dtype: dtype of the non-expert weights and activations; scales are ``dtype`` when 16-bit, else bf16.
        backend: kernel backend of the quantized experts (``auto``: the measured dispatch table, ``moeq_kernels.dispatch``).
        online_hadamard: whether the experts apply the online Hadamard to the down-projection input.
    Returns:
        The model; no parameter or buffer is left on meta, and no dense expert weight was ever allocated.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(model)
    scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    n_moe = 0
    for _, block in adapter.moe_layers(model):
        old = adapter.experts(block)
        e, two_i, h = old.gate_up_proj.shape
        q = QuantizedExperts(e, h, two_i // 2, spec, spec, scale_dtype, "silu", online_hadamard, backend, device)
        fill_random_packed_(q)
        setattr(block, adapter.experts_attr, q.eval())
        n_moe += 1
    std = getattr(config, "initializer_range", 0.02) or 0.02
    done: dict[int, nn.Parameter] = {}  # tied parameters (one object, several owners) get one tensor
    for mod_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in done:
                done[id(p)] = _init_like(f"{mod_name}.{name}", p, device, std)
            module._parameters[name] = done[id(p)]
    model.to(device)  # buffers (rotary inv_freq, ...) were built real on the CPU
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"{len(left)} tensors left on meta, e.g. {left[:3]}")
    logger.info("random %s: %d layers, %d QuantizedExperts (%s) on %s", config.model_type,
                config.num_hidden_layers, n_moe, spec, device)
    return model.eval()


def quantized_experts_bytes(model: nn.Module) -> int:
    """Bytes held by all ``QuantizedExperts`` buffers of ``model``."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedExperts))


def dense_experts_bytes(model: nn.Module, bytes_per_weight: int = 2) -> int:
    """Bytes the same routed experts would take as dense ``bytes_per_weight`` weights (bf16: 2)."""
    return sum(3 * m.num_experts * m.hidden_dim * m.intermediate_dim * bytes_per_weight
               for m in model.modules() if isinstance(m, QuantizedExperts))
