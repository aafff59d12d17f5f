"""The one model-agnostic sequential calibration loop (GPTQ-family methods).

Per decoder layer, with only that layer on the compute device:
1. stage 1: one pass over all calibration samples collects every Hessian whose inputs do not depend on
   another quantized linear of the layer: attention input linears, shared-expert gate/up, routed gate_up
   (through :class:`CalibExperts`, with the router's routing for the same tokens); quantize them;
2. stage 2: one pass through the layer with stage-1 modules quantized collects the inputs of ``o_proj``,
   shared ``down_proj`` and routed ``down_proj`` (computed with the quantized gate_up); quantize them;
3. stage 3: one pass through the fully quantized layer produces the next layer's inputs.
Padding (``attention_mask == 0``) is masked out of every Hessian.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moeq.calib.expert_tokens import expert_token_stats, format_token_stats
from moeq.config import QuantConfig
from moeq.memory import release_freed_memory
from moeq.models import MoEAdapter
from moeq.nn.dense_cache import dense_weights
from moeq.quantizers.gptq_layer import LayerQuantizer

logger = logging.getLogger(__name__)


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Inputs of the current decoder layer: hidden ``[1, L, H]`` per sample (on ``store``), the layer kwargs
    per sample (position embeddings, masks), and the token mask ``[L]`` per sample."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    masks: list[torch.Tensor]


def _non_layer_modules(model: nn.Module, adapter: MoEAdapter) -> list[nn.Module]:
    base = model.get_submodule(adapter.layers_path.rpartition(".")[0])
    layers = adapter.layers(model)
    return [m for n, m in base.named_children() if m is not layers]


@torch.no_grad()
def capture_inputs(model, adapter, ids: torch.Tensor, attention_mask: torch.Tensor | None, device, store,
                   hidden=None) -> LayerInputs:
    """Run the embedding part of the model on every sample and capture the first decoder layer's inputs
    (into ``hidden``, any object with ``append``, e.g. :class:`moeq.pipeline.activations.DiskActivations`;
    default a list)."""
    layers = adapter.layers(model)
    out = LayerInputs([] if hidden is None else hidden, [], [])

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        out.hidden.append(hidden.to(store))
        out.kwargs.append(dict(kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    # modules still on meta (the streaming pipeline's final norm) are not needed before the first layer
    moved = [m for m in _non_layer_modules(model, adapter) if not any(t.is_meta for t in m.state_dict().values())]
    for m in moved:
        m.to(device)
    try:
        for j in range(ids.shape[0]):
            am = None if attention_mask is None else attention_mask[j : j + 1].to(device)
            out.masks.append(torch.ones(ids.shape[1]) if am is None else am[0].float().cpu())
            try:
                model(input_ids=ids[j : j + 1].to(device), attention_mask=am, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return out


def iter_layer(layer: nn.Module, inputs: LayerInputs, device, on_sample=None):
    """The layer's output ``[1, L, H]`` for each calibration sample in turn (one sample in flight); its
    quantized modules dequantize each weight once for all samples (:func:`moeq.nn.dense_cache.dense_weights`)."""
    with dense_weights(layer):
        for j, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            if on_sample is not None:
                on_sample(j)
            y = layer(h.to(device), **kw)
            yield y[0] if isinstance(y, tuple) else y
            release_freed_memory()


def _run_layer(layer: nn.Module, inputs: LayerInputs, device, on_sample=None) -> list[torch.Tensor]:
    return list(iter_layer(layer, inputs, device, on_sample))


@torch.no_grad()
def run_sequential(model: nn.Module, adapter: MoEAdapter, config: QuantConfig, ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, affinity: str, report, device=None) -> dict:
    """Quantize ``model`` layer by layer on calibration ``ids [n, L]``; returns calibration metadata
    (token counts per expert and the few-token fallbacks) keyed by experts module name."""
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    store = torch.device("cpu") if device.type == "cpu" else device
    inputs = capture_inputs(model, adapter, ids, attention_mask, device, store)
    meta = {}
    layers = adapter.layers(model)
    for i in tqdm(range(len(layers)), desc=f"{config.method}: layers", unit="layer"):
        layer = layers[i].to(device)  # offload: only this layer is on the compute device
        meta.update(gptq_layer(layer, i, adapter, config, inputs, affinity, report, device))
        inputs.hidden = run_layer(layer, inputs, device, store)
        layers[i].to(home)
    for m in _non_layer_modules(model, adapter):
        m.to(home)
    return meta


def gptq_layer(layer: nn.Module, idx: int, adapter: MoEAdapter, config: QuantConfig, inputs: LayerInputs,
               affinity: str, report, device, hessian_bytes: int | None = None, scratch=None) -> dict:
    """GPTQ/AGQ of decoder layer ``idx`` (on ``device``) in place from its calibration ``inputs`` (stage 1, then
    stage 2; the caller propagates the outputs); returns the layer's calibration metadata by experts name.
    ``hessian_bytes``: the experts' Hessians are collected in chunks of experts of about this size
    (default :data:`moeq.quantizers.gptq_layer.HESSIAN_BYTES`; same results whatever it is); ``scratch``: a
    directory for the experts' recorded inputs when there are several chunks (None: memory)."""
    lq = LayerQuantizer(adapter, config, idx, layer, affinity, report, device, hessian_bytes, scratch)
    for stage in (1, 2):
        _calibrate_stage(lq, stage, inputs, device)
    for name, m in lq.metadata.items():  # what each expert's Hessian was built from (min/median/few-token)
        logger.info("%s: %s", name, format_token_stats(expert_token_stats(m["tokens"], m["total_tokens"],
                                                                         threshold=m["threshold"])))
    return lq.metadata


def run_layer(layer: nn.Module, inputs: LayerInputs, device, store) -> list[torch.Tensor]:
    """The layer's outputs ``[1, L, H]`` per sample (on ``store``): the next layer's inputs."""
    return [o.to(store) for o in _run_layer(layer, inputs, device)]


def observe_layer(layer: nn.Module, inputs: LayerInputs, device, probe) -> None:
    """Run every calibration sample through ``layer`` for the hooks of ``probe`` (``probe.set_mask(mask [L])``
    before each sample, ``probe.remove()`` at the end); the outputs are dropped."""
    try:
        for _ in iter_layer(layer, inputs, device, on_sample=lambda j: probe.set_mask(inputs.masks[j].to(device))):
            pass
    finally:
        probe.remove()


def _calibrate_stage(lq: "LayerQuantizer", stage: int, inputs: LayerInputs, device) -> None:
    """One calibration pass of a stage: install hooks, run all samples, quantize what they measured."""
    lq.begin(stage)
    try:
        for _ in iter_layer(lq.layer, inputs, device, on_sample=lambda j: lq.set_mask(inputs.masks[j].to(device))):
            pass  # the hooks measured what they need; the outputs are recomputed by the propagation pass
    finally:
        lq.end(stage)
