"""The quantization methods registered in ``moeq.quantizers.METHODS``: rtn, gptq, agq."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from moeq.config import QuantConfig
from moeq.models import MoEAdapter
from moeq.nn.experts import QuantizedExperts
from moeq.nn.mixed import MixedQuantizedExperts, build_experts
from moeq.quantize_linear import linear_targets, quantize_linear_rtn, set_module
from moeq.quantizers import register_method
from moeq.quantizers.report import ModuleReport, QuantReport, rel_error
from moeq.quantizers.rtn import relative_error, rtn_quantize_with_error
from moeq_kernels.experts import ExpertWeights

logger = logging.getLogger("moeq.quantize")


def quantize_experts_rtn(name: str, experts: nn.Module, config: QuantConfig, report: QuantReport) -> nn.Module:
    """RTN of one fused experts module into a :class:`QuantizedExperts` (or, under a mixed-precision plan, a
    :class:`MixedQuantizedExperts`) on the device of its weights."""
    scale_dtype = config.resolve_scale_dtype(experts.gate_up_proj.dtype)
    mixed = config.is_mixed(name)
    parts = {}
    for proj, w in (("gate_up", experts.gate_up_proj.detach()), ("down", experts.down_proj.detach())):
        t0 = time.perf_counter()
        specs = [config.spec_for(name, proj, e) for e in range(w.shape[0])]
        args = (scale_dtype, config.w_clip, config.clip_grid, config.clip_max_shrink, config.clip_norm)
        # the error sums come with the quantization: no dequantized copy of the stack for the report
        if mixed:  # one expert at a time, each with its own spec
            outs = [rtn_quantize_with_error(w[e], s, *args) for e, s in enumerate(specs)]
            parts[proj] = [o[0] for o in outs]
            rel = relative_error(sum(o[1] for o in outs), sum(o[2] for o in outs))
        else:
            p, err_sq, w_sq = rtn_quantize_with_error(w, specs[0], *args)
            parts[proj], rel = [p], relative_error(err_sq, w_sq)
        report.add(ModuleReport(f"{name}.{proj}", tuple(w.shape), specs[0].bits, parts[proj][0].group_size,
                                rel, time.perf_counter() - t0))
    if not mixed:  # one scheme: the stacks as they are (splitting and re-concatenating them
        # per expert copied ~0.3 GB and took 0.5 s per Qwen3-30B-A3B-shaped layer)
        weights = ExpertWeights(parts["gate_up"][0], parts["down"][0], online_hadamard=config.online_hadamard)
        return QuantizedExperts.from_weights(weights, backend=config.backend)
    return build_experts(parts["gate_up"], parts["down"], config.online_hadamard, config.backend)


def rtn_layer(layer: nn.Module, idx: int, adapter: MoEAdapter, config: QuantConfig, report: QuantReport) -> None:
    """RTN of decoder layer ``idx`` in place: its listed linears, then its routed experts."""
    prefix = f"{adapter.layers_path}.{idx}"
    for name, (linear, _) in linear_targets(layer, adapter, config, prefix).items():
        t0 = time.perf_counter()
        q = quantize_linear_rtn(linear, config.spec_for(name, "linear"), config)
        report.add(ModuleReport(name, tuple(linear.weight.shape), q.spec.bits, q.group_size,
                                rel_error(linear.weight, q.packed().dequantize(torch.float32)), time.perf_counter() - t0))
        set_module(layer, name[len(prefix) + 1 :], q)
    block = adapter.moe_block(layer)
    if block is None:
        return
    experts = adapter.experts(block)
    if isinstance(experts, (QuantizedExperts, MixedQuantizedExperts)):
        raise ValueError(f"{adapter.experts_name(idx)} is already quantized")
    setattr(block, adapter.experts_attr, quantize_experts_rtn(adapter.experts_name(idx), experts, config, report))


@register_method("rtn", needs_calibration=False, description="round-to-nearest, per-group MSE clip search")
def _rtn(model: nn.Module, adapter: MoEAdapter, config: QuantConfig, calib, device) -> QuantReport:
    report = QuantReport()
    for i, layer in enumerate(tqdm(adapter.layers(model), desc="rtn: layers", unit="layer")):
        rtn_layer(layer, i, adapter, config, report)
    return report


def _calib_tensors(calib) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(calib, dict):
        ids, mask = calib["input_ids"], calib.get("attention_mask")
    else:
        ids, mask = calib, None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError("calibration input_ids must be an int64 tensor [nsamples, seqlen]")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
    return ids, mask


def _gptq_family(model, adapter, config, calib, device, affinity: str) -> QuantReport:
    from moeq.runner import run_sequential

    ids, mask = _calib_tensors(calib)
    report = QuantReport()
    report.calibration = run_sequential(model, adapter, config, ids, mask, affinity, report, device)
    report.calibration["_samples"] = {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                                      "tokens": int(ids.numel() if mask is None else mask.sum())}
    return report


@register_method("gptq", needs_calibration=True, description="GPTQ; routed experts get Hessians of their routed tokens")
def _gptq(model, adapter, config, calib, device) -> QuantReport:
    return _gptq_family(model, adapter, config, calib, device, "none")


@register_method("agq", needs_calibration=True,
                 description="affinity-guided GPTQ (MoEQuant): each token's Hessian share weighted by its router affinity")
def _agq(model, adapter, config, calib, device) -> QuantReport:
    if config.affinity == "none":
        raise ValueError("agq with affinity='none' is plain gptq; choose affinity topk or softmax")
    return _gptq_family(model, adapter, config, calib, device, config.affinity)
