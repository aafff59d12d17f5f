"""The stages of the streaming pipeline: what acts on one decoder layer while it is materialized.

The protocol is one small class per stage (:class:`Stage`): ``needs_inputs`` (the layer's calibration
activations must be there), ``outer(model, adapter, part)`` for the few stages that also touch the non-layer
tensors (rotation: ``"embed"`` before the layer loop, ``"head"`` at the end) and ``run(ctx)`` on one layer.
A stage records what it did in ``ctx.calibration`` (merged into ``quantization_config["calibration"]``) and its
modules in ``ctx.report``. :func:`stages_for` turns a :class:`~moeq.config.QuantConfig` into the ordered list;
the order is the one :func:`moeq.quantize_model` applies to a whole model: rotation -> smoothing -> router
-> method -> activation specs. A new stage is one class here (or in its own file) plus its line in :func:`stages_for`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moeq.config import QuantConfig
from moeq.models import MoEAdapter
from moeq.quantizers.report import QuantReport
from moeq.runner import LayerInputs

logger = logging.getLogger(__name__)


@dataclass
class LayerContext:
    """One decoder layer while the pipeline holds it.

    Attributes:
        idx, layer: its index and module (weights materialized, on ``device``).
        inputs: its calibration inputs (hidden ``[1, L, H]`` per sample, layer kwargs, token masks), or None
            when no stage needs them.
        calibration: calibration metadata of this layer, by key of ``quantization_config["calibration"]``
            (``smoothing.layers`` / ``router_alignment`` entries are nested under those keys).
        scratch: a directory for a stage's temporary activation files (under ``--offload-dir``), or None.
    """

    idx: int
    layer: nn.Module
    adapter: MoEAdapter
    config: QuantConfig
    inputs: LayerInputs | None
    device: torch.device
    report: QuantReport
    calibration: dict = field(default_factory=dict)
    scratch: Path | None = None


class Stage:
    """Base of the pipeline stages (see the module docstring)."""

    name = "stage"
    needs_inputs = False

    def outer(self, model: nn.Module, adapter: MoEAdapter, part: str) -> None:
        """Act on the non-layer tensors: ``part`` is ``"embed"`` (before the layers) or ``"head"`` (after)."""

    def run(self, ctx: LayerContext) -> None:
        raise NotImplementedError


class RotationStage(Stage):
    """QuaRot-style rotation (:mod:`moeq.rotation`): its matrix is fixed up front, so it is applied to each
    layer as the layer is loaded and to the embeddings / lm_head on their own."""

    name = "rotate"

    def __init__(self, config: QuantConfig, hidden_size: int):
        from moeq.rotation.rotate import random_hadamard

        rot = config.stage("rotation")
        self.q = random_hadamard(hidden_size, rot.rotation_seed)
        # composed with smoothing, the online Hadamard is folded after the down smoothing (OnlineHadamardStage)
        self.online = rot.online_hadamard and not config.smooth

    def outer(self, model, adapter, part):
        from moeq.rotation.rotate import rotate_outer

        rotate_outer(model, adapter, self.q, embed=part == "embed", head=part == "head")

    def run(self, ctx):
        from moeq.rotation.rotate import rotate_layer

        rotate_layer(ctx.layer, ctx.adapter, self.q, self.online)


class SmoothStage(Stage):
    """EAQuant expert-aware smoothing (:func:`moeq.smoothing.smooth_layer`) from this layer's inputs."""

    name = "smooth"
    needs_inputs = True

    def run(self, ctx):
        from moeq.smoothing import smooth_layer

        c = ctx.config.stage("smoothing")
        entry = smooth_layer(ctx.layer, ctx.idx, ctx.adapter, ctx.inputs, ctx.device, c.smooth_alpha,
                             c.smooth_aggregation, c.smooth_down)
        if entry is not None:
            ctx.calibration["smoothing"] = {"alpha": c.smooth_alpha, "aggregation": c.smooth_aggregation,
                                            "down_proj": c.smooth_down,
                                            "layers": {ctx.adapter.experts_name(ctx.idx): entry}}


class OnlineHadamardStage(Stage):
    """Rotation composed with smoothing: the offline half of the online Hadamard, folded into the smoothed
    down weights (``moeq.quantize.transform_model`` explains the order)."""

    name = "hadamard"

    def run(self, ctx):
        from moeq.rotation.rotate import online_hadamard_layer

        block = ctx.adapter.moe_block(ctx.layer)
        if block is not None:
            online_hadamard_layer(block, ctx.adapter)


class RouterStage(Stage):
    """8-bit routers: KL-aligned clipping from this layer's inputs (``align``), else absmax rounding."""

    name = "router"

    def __init__(self, align: bool):
        self.needs_inputs = align

    def run(self, ctx):
        from moeq.quantize_linear import round_router
        from moeq.router_align import align_router_layer, router_name

        block = ctx.adapter.moe_block(ctx.layer)
        if block is None:
            return
        if self.needs_inputs:
            rec = align_router_layer(ctx.layer, ctx.idx, ctx.adapter, ctx.inputs, ctx.device)
            ctx.calibration["router_alignment"] = {router_name(ctx.adapter, ctx.idx): rec}
            return
        rel = round_router(ctx.adapter.router(block))
        logger.info("%s rounded to 8 bits (rel. change %.2e)", router_name(ctx.adapter, ctx.idx), rel)


class MethodStage(Stage):
    """The quantization method on this layer: ``rtn`` (no inputs) or GPTQ/AGQ (from its inputs)."""

    def __init__(self, config: QuantConfig, hessian_bytes: int | None = None):
        from moeq.quantizers import get_method

        get_method(config.method)  # an unknown name fails here, before any layer is read
        self.name = config.method
        self.hessian_bytes = hessian_bytes
        self.needs_inputs = config.method != "rtn"
        self.affinity = {"gptq": "none", "agq": config.affinity}.get(config.method)
        if config.method not in ("rtn", "gptq", "agq"):
            raise ValueError(f"method {config.method!r} has no per-layer form for the streaming pipeline "
                             "(rtn, gptq, agq)")
        if config.method == "agq" and config.affinity == "none":
            raise ValueError("agq with affinity='none' is plain gptq; choose affinity topk or softmax")

    def run(self, ctx):
        from moeq.methods import rtn_layer
        from moeq.runner import gptq_layer

        if not self.needs_inputs:
            rtn_layer(ctx.layer, ctx.idx, ctx.adapter, ctx.config, ctx.report)
            return
        meta = gptq_layer(ctx.layer, ctx.idx, ctx.adapter, ctx.config, ctx.inputs, self.affinity, ctx.report,
                          ctx.device, self.hessian_bytes, ctx.scratch)
        ctx.calibration.update(meta)


class ActStage(Stage):
    """Activation quantization specs of the quantized layer (:mod:`moeq.act_calib`): clip ratios searched on
    this layer's inputs (``act_clip_search``) or ``act_clip`` everywhere. The next layers see its quantized
    activations, as they will at run time."""

    name = "act"

    def __init__(self, config: QuantConfig):
        self.needs_inputs = config.act_clip_search

    def run(self, ctx):
        from moeq.act_calib import calibrate_layer_act, layer_act_specs

        c = ctx.config
        if self.needs_inputs:
            mods = calibrate_layer_act(ctx.layer, ctx.adapter, c, ctx.idx, ctx.inputs, ctx.device)
            grid = sorted({float(x) for x in c.act_clip_grid}, reverse=True)
            ctx.calibration["activations"] = {"clip_search": True, "grid": grid, "modules": mods}
        else:
            mods = layer_act_specs(ctx.layer, ctx.adapter, c, ctx.idx)
            ctx.calibration["activations"] = {"clip_search": False, "modules": mods}


def stages_for(config: QuantConfig, hidden_size: int, has_calib: bool, hessian_bytes: int | None = None) -> list[Stage]:
    """The ordered stages ``config`` enables (``has_calib``: calibration tokens were given; ``hessian_bytes``:
    the GPTQ-family experts' Hessian chunk size, see :func:`moeq.runner.gptq_layer`)."""
    out: list[Stage] = []
    if config.rotation is not None:
        out.append(RotationStage(config, hidden_size))
    if config.smooth:
        out.append(SmoothStage())
        if config.rotation is not None and config.online_hadamard:
            out.append(OnlineHadamardStage())
    router = config.stage("router")
    if router.router_bits == 8:
        out.append(RouterStage(align=router.router_align and has_calib))
    out.append(MethodStage(config, hessian_bytes))
    if config.act_bits is not None:
        out.append(ActStage(config))
    missing = [s.name for s in out if s.needs_inputs and not has_calib]
    if missing:
        raise ValueError(f"{', '.join(missing)} need(s) calibration data (calib=...)")
    return out


def merge_calibration(into: dict, layer: dict) -> None:
    """Merge one layer's calibration metadata into the run's (``smoothing`` / ``router_alignment`` nest)."""
    for key, value in layer.items():
        if key == "smoothing":
            cur = into.setdefault("smoothing", {**value, "layers": {}})
            cur["layers"].update(value["layers"])
        elif key == "activations":
            cur = into.setdefault("activations", {**value, "modules": {}})
            cur["modules"].update(value["modules"])
        elif key == "router_alignment":
            into.setdefault("router_alignment", {}).update(value)
        else:
            into[key] = value
