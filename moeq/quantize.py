"""``quantize_model``: replace every routed-experts module of a supported MoE model by ``QuantizedExperts``."""

from __future__ import annotations

import torch
from torch import nn

from moeq import methods  # noqa: F401  (registers the methods)
from moeq.config import QuantConfig
from moeq.models import MoEAdapter, adapter_for
from moeq.quantize_linear import round_router
from moeq.quantizers import get_method
from moeq.quantizers.report import ModuleReport, QuantReport
from moeq.rotation import rotate_model

__all__ = ["ModuleReport", "QuantReport", "quantize_model"]


def quantize_model(model: nn.Module, config: QuantConfig | None = None, calib=None, device=None) -> QuantReport:
    """Quantize ``model`` in place with ``config.method``.

    Args:
        calib: calibration tokens for GPTQ-family methods: int64 ``[n, L]`` or a dict with ``input_ids [n, L]``
            and ``attention_mask [n, L]`` (padding is masked out of every Hessian).
        device: compute device of calibration; the model may stay on the CPU (layers move one at a time).
    Routers (unless ``router_bits=8``), shared-expert gates, embeddings and lm_head keep their precision;
    attention / shared experts / dense MLPs are quantized only when listed in ``config.quantize_linears``.
    The model's config gains ``quantization_config`` (see :mod:`moeq.io`).
    Raises ``UnsupportedModelError`` for unsupported architectures and ``ValueError`` for bad configs.
    """
    config = config or QuantConfig()
    adapter = adapter_for(model)
    adapter.check(model)
    method = get_method(config.method)
    if method.needs_calibration and calib is None:
        raise ValueError(f"method {config.method!r} needs calibration data (calib=...)")
    with torch.no_grad():
        if config.rotation is not None:
            rotate_model(model, adapter, config.rotation_seed, config.online_hadamard)
        if config.router_bits == 8:
            for idx, block in adapter.moe_layers(model):
                rel = round_router(adapter.router(block))
                methods.logger.info("%s.%s rounded to 8 bits (rel. change %.2e)", adapter.experts_name(idx).rpartition(".")[0],
                                    adapter.router_attr, rel)
        report = method.fn(model, adapter, config, calib, device)
    record_quantization(model, adapter, config, report.calibration)
    return report


def record_quantization(model: nn.Module, adapter: MoEAdapter, config: QuantConfig, calibration: dict | None = None) -> None:
    """Write the ``quantization_config`` (global settings + every quantized module's specs) onto the model."""
    from moeq.io.checkpoint import quantization_config_dict

    model.config.quantization_config = quantization_config_dict(model, adapter, config, calibration or {})
