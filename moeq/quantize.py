"""``quantize_model``: replace every routed-experts module of a supported MoE model by ``QuantizedExperts``."""

from __future__ import annotations

import torch
from torch import nn

from moeq import methods  # noqa: F401  (registers the methods)
from moeq.act_calib import calibrate_act
from moeq.config import QuantConfig
from moeq.models import MoEAdapter, adapter_for
from moeq.quantize_linear import linear_targets, round_router
from moeq.quantizers import get_method
from moeq.quantizers.report import ModuleReport, QuantReport
from moeq.rotation import rotate_model
from moeq.rotation.rotate import apply_online_hadamard
from moeq.router_align import align_routers
from moeq.smoothing import calib_tensors, smooth_model

__all__ = ["ModuleReport", "QuantReport", "quantize_model"]


def quantize_model(model: nn.Module, config: QuantConfig | None = None, calib=None, device=None) -> QuantReport:
    """Quantize ``model`` in place with ``config.method``.

    Args:
        calib: calibration tokens for GPTQ-family methods: int64 ``[n, L]`` or a dict with ``input_ids [n, L]``
            and ``attention_mask [n, L]`` (padding is masked out of every Hessian).
        device: compute device of calibration; the model may stay on the CPU (layers move one at a time).
    Order: rotation and/or EAQuant smoothing (``config.smooth``, needs ``calib`` for every method) -> 8-bit
    routers (``router_bits=8``: KL-aligned clipping with ``calib``, plain absmax without) -> the method ->
    activation specs (``act_bits``: per-layer clip search on ``calib`` when ``act_clip_search``,
    :mod:`moeq.act_calib`).
    Routers (unless ``router_bits=8``), shared-expert gates, embeddings and lm_head keep their precision;
    attention / shared experts / dense MLPs are quantized only when listed in ``config.quantize_linears``.
    The model's config gains ``quantization_config`` (see :mod:`moeq.io`).
    Raises ``UnsupportedModelError`` for unsupported architectures and ``ValueError`` for bad configs.
    """
    config = config or QuantConfig()
    adapter = adapter_for(model)
    adapter.check(model)
    check_module_names(model, adapter, config)
    check_finite(model)
    method = get_method(config.method)
    if method.needs_calibration and calib is None:
        raise ValueError(f"method {config.method!r} needs calibration data (calib=...)")
    if config.smooth and calib is None:
        raise ValueError("smooth=True needs calibration data (calib=...) for every method, rtn included: "
                         "the smoothing scales come from activation statistics")
    if config.act_clip_search and calib is None:
        raise ValueError("act_clip_search needs calibration data (calib=...) for every method, rtn included")
    with torch.no_grad():
        extra = transform_model(model, adapter, config, calib, device)
        extra.update(_round_routers(model, adapter, config, calib, device))
        report = method.fn(model, adapter, config, calib, device)
        if config.act_bits is not None:
            extra["activations"] = calibrate_act(model, adapter, config, calib, device)
    report.calibration.update(extra)
    if extra and calib is not None and "_samples" not in report.calibration:
        ids, mask = calib_tensors(calib)
        report.calibration["_samples"] = {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                                          "tokens": int(ids.numel() if mask is None else mask.sum())}
    record_quantization(model, adapter, config, report.calibration)
    return report


def check_module_names(model: nn.Module, adapter: MoEAdapter, config: QuantConfig) -> None:
    """Every ``overrides`` / ``expert_bits`` key names a module this run quantizes (a misspelled name would
    otherwise be ignored silently)."""
    experts = {adapter.experts_name(i) for i, _ in adapter.moe_layers(model)}
    linears = set()
    for i, layer in enumerate(adapter.layers(model)):
        linears.update(linear_targets(layer, adapter, config, f"{adapter.layers_path}.{i}"))
    valid = experts | {f"{e}.{p}" for e in experts for p in ("gate_up", "down")} | linears
    for what, names in (("overrides", config.overrides), ("expert_bits", config.expert_bits)):
        unknown = sorted(set(names) - (valid if what == "overrides" else experts))
        if unknown:
            example = sorted(experts)[0]
            raise ValueError(f"{what} names {unknown[0]!r}, which is not a module this run quantizes "
                             f"({len(unknown)} unknown); routed experts are named like {example!r} (add .gate_up / "
                             f".down for one projection){'; quantized linears by their module name' if linears else ''}")


def check_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf weights before any work (they would become non-finite scales), naming tensor and index."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta":
            bad = ~torch.isfinite(p.detach())
            if bool(bad.any()):
                idx = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(f"{name}: non-finite weight {float(p.detach()[idx])} at index {idx}; the source "
                                 "checkpoint is damaged (refusing to quantize it)")


def transform_model(model: nn.Module, adapter: MoEAdapter, config: QuantConfig, calib=None, device=None) -> dict:
    """The function-preserving transforms before quantization, in place: rotation (``config.rotation``) and/or
    EAQuant smoothing (``config.smooth``, needs ``calib``). Both: rotate without the online Hadamard, smooth the
    rotated model, then fold the online Hadamard into the smoothed down weights (``moeq.smoothing`` explains the
    order). Returns the smoothing record (``{"smoothing": ...}``) or ``{}``."""
    if config.rotation is not None:  # with smoothing, the online Hadamard waits for the down smoothing
        rotate_model(model, adapter, config.rotation_seed, config.online_hadamard and not config.smooth)
    if not config.smooth:
        return {}
    rep = smooth_model(model, adapter, calib, config.smooth_alpha, config.smooth_aggregation, config.smooth_down,
                       device)
    if config.rotation is not None and config.online_hadamard:
        apply_online_hadamard(model, adapter)
    return {"smoothing": rep.to_dict()}


def _round_routers(model, adapter, config: QuantConfig, calib, device) -> dict:
    """8-bit routers (KL-aligned with calibration data, absmax without); returns their calibration metadata
    (``router_alignment``)."""
    extra = {}
    if config.router_bits == 8 and config.router_align and calib is not None:
        extra["router_alignment"] = align_routers(model, adapter, calib, device)
    elif config.router_bits == 8:
        for idx, block in adapter.moe_layers(model):
            rel = round_router(adapter.router(block))
            methods.logger.info("%s.%s rounded to 8 bits (rel. change %.2e)", adapter.experts_name(idx).rpartition(".")[0],
                                adapter.router_attr, rel)
    return extra


def record_quantization(model: nn.Module, adapter: MoEAdapter, config: QuantConfig, calibration: dict | None = None) -> None:
    """Write the ``quantization_config`` (global settings + every quantized module's specs) onto the model."""
    from moeq.io.checkpoint import quantization_config_dict

    model.config.quantization_config = quantization_config_dict(model, adapter, config, calibration or {})
