"""``quantize_model``: replace every routed-experts module of a supported MoE model by ``QuantizedExperts``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from moeq.config import QuantConfig
from moeq.models import MoEAdapter, adapter_for
from moeq.nn.experts import QuantizedExperts
from moeq.quantizers import get_method, register_method
from moeq.quantizers.rtn import rtn_quantize

logger = logging.getLogger(__name__)


@dataclass
class ModuleReport:
    """What quantizing one weight stack did: relative weight error ``||W - Q||_F / ||W||_F``, seconds."""

    name: str
    shape: tuple[int, ...]
    bits: int
    group_size: int
    rel_error: float
    seconds: float
    tokens: int | None = None


@dataclass
class QuantReport:
    modules: list[ModuleReport] = field(default_factory=list)

    def add(self, rep: ModuleReport) -> None:
        self.modules.append(rep)
        tok = "" if rep.tokens is None else f" tokens={rep.tokens}"
        logger.info("%s %s w%dg%d rel_err=%.4e%s %.2fs", rep.name, rep.shape, rep.bits, rep.group_size,
                    rep.rel_error, tok, rep.seconds)


def quantize_model(model: nn.Module, config: QuantConfig | None = None, calib=None) -> QuantReport:
    """Quantize ``model``'s routed experts in place with ``config.method``.

    Routers (``mlp.gate``), shared-expert gates, embeddings, lm_head, attention and shared experts stay in
    their original precision. The model's config gains ``quantization_config`` (see :mod:`moeq.io`).
    Raises ``UnsupportedModelError`` for unsupported architectures and ``ValueError`` for bad configs.
    """
    config = config or QuantConfig()
    adapter = adapter_for(model)
    adapter.check(model)
    method = get_method(config.method)
    if method.needs_calibration and calib is None:
        raise ValueError(f"method {config.method!r} needs calibration data (calib=...)")
    with torch.no_grad():
        report = method.fn(model, adapter, config, calib)
    record_quantization(model, adapter, config)
    return report


def record_quantization(model: nn.Module, adapter: MoEAdapter, config: QuantConfig) -> None:
    """Write the ``quantization_config`` (global settings + every quantized module's specs) onto the model."""
    from moeq.io.checkpoint import quantization_config_dict

    model.config.quantization_config = quantization_config_dict(model, adapter, config)


def _rel_error(w: torch.Tensor, q: torch.Tensor) -> float:
    w = w.detach().float()
    return float((w - q.float()).norm() / w.norm().clamp_min(1e-30))


def quantize_experts_rtn(name: str, experts: nn.Module, config: QuantConfig, report: QuantReport) -> QuantizedExperts:
    """RTN of one fused experts module into a :class:`QuantizedExperts` (same device as its weights)."""
    scale_dtype = config.resolve_scale_dtype(experts.gate_up_proj.dtype)
    packed = {}
    for prefix, proj, w in (("w13", "gate_up", experts.gate_up_proj), ("w2", "down", experts.down_proj)):
        t0 = time.perf_counter()
        spec = config.spec_for(name, proj)
        p = rtn_quantize(w.detach(), spec, scale_dtype, config.w_clip, config.clip_grid, config.clip_max_shrink, config.clip_norm)
        packed[prefix] = p
        report.add(ModuleReport(f"{name}.{proj}", tuple(w.shape), spec.bits, p.group_size,
                                _rel_error(w, p.dequantize(torch.float32)), time.perf_counter() - t0))
    return QuantizedExperts.from_packed(packed["w13"], packed["w2"], online_hadamard=config.online_hadamard,
                                        backend=config.backend)


@register_method("rtn", needs_calibration=False, description="round-to-nearest, per-group MSE clip search")
def _rtn(model: nn.Module, adapter: MoEAdapter, config: QuantConfig, calib) -> QuantReport:
    report = QuantReport()
    for idx, block in tqdm(adapter.moe_layers(model), desc="rtn: MoE layers", unit="layer"):
        name = adapter.experts_name(idx)
        experts = adapter.experts(block)
        if isinstance(experts, QuantizedExperts):
            raise ValueError(f"{name} is already quantized")
        setattr(block, adapter.experts_attr, quantize_experts_rtn(name, experts, config, report))
    return report
