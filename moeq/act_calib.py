"""Activation quantization of a quantized model: which modules get an ``ActSpec`` and each one's clip ratio.

Targets: every routed-experts module (its gate_up input ``act13`` and its down input ``act2``, the latter after
the online Hadamard) and the quantized linears of the groups in ``QuantConfig.act_linears``. The format is
:mod:`moeq_kernels.act_quant` (dynamic per-token symmetric scales, ``scale = clip * absmax / qmax``).

Clip search (``act_clip_search``), one decoder layer at a time (:func:`calibrate_layer_act`): the layer is run on
its captured calibration inputs with 16-bit activations, recording what reaches each target (padding excluded);
then, for each target, every ratio of ``act_clip_grid`` is tried and the one with the smallest summed squared
error of the module's output against its own 16-bit-activation output (same quantized weights) is kept; ties go
to the larger ratio (the grid is scanned from 1.0 down, a ratio must be strictly better). For experts, ``act13`` is
searched with the down input in 16 bits, then ``act2`` with ``act13`` fixed at its choice (2 x grid evaluations,
not grid^2). The error is the one the layer's residual stream receives from the module (the experts' output is
already weighted by the routing weights), so it is measured where it matters.

Sequential (:func:`calibrate_act`): the next layer's inputs come from this layer with its chosen activation
specs applied, as the deployed model computes them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from moeq.config import QuantConfig
from moeq.models import MoEAdapter
from moeq.nn.experts import QuantizedExperts
from moeq.nn.linear import QuantizedLinear
from moeq.nn.mixed import MixedQuantizedExperts
from moeq_kernels.act_quant import ActSpec

logger = logging.getLogger(__name__)


def act_linear_names(layer: nn.Module, adapter: MoEAdapter, config: QuantConfig, prefix: str) -> dict[str, QuantizedLinear]:
    """``{qualified name: QuantizedLinear}`` of the layer's quantized linears in ``config.act_linears`` groups."""
    roots = []
    block = adapter.moe_block(layer)
    if "attention" in config.act_linears:
        roots.append(adapter.attn_attr)
    if "shared_experts" in config.act_linears and block is not None and adapter.shared_attr:
        roots.append(f"{adapter.mlp_attr}.{adapter.shared_attr}")
    if "dense_mlp" in config.act_linears and block is None:
        roots.append(adapter.mlp_attr)
    out = {}
    for root in roots:
        for name, mod in layer.get_submodule(root).named_modules():
            if isinstance(mod, QuantizedLinear):
                out[f"{prefix}.{root}.{name}"] = mod
    return out


def _layer_experts(layer: nn.Module, adapter: MoEAdapter):
    block = adapter.moe_block(layer)
    ex = None if block is None else adapter.experts(block)
    return ex if isinstance(ex, (QuantizedExperts, MixedQuantizedExperts)) else None


def apply_act_specs(model: nn.Module, adapter: MoEAdapter, config: QuantConfig) -> dict:
    """Every target gets ``config.act_spec()`` (clip ``act_clip``, no search); returns the per-module clips."""
    out = {}
    for i, layer in enumerate(adapter.layers(model)):
        out.update(layer_act_specs(layer, adapter, config, i))
    return out


def layer_act_specs(layer: nn.Module, adapter: MoEAdapter, config: QuantConfig, idx: int) -> dict:
    """:func:`apply_act_specs` on decoder layer ``idx`` only."""
    spec = config.act_spec()
    out = {}
    ex = _layer_experts(layer, adapter)
    if ex is not None:
        ex.set_act_specs(spec, spec)
        out[adapter.experts_name(idx)] = {"act13_clip": spec.clip, "act2_clip": spec.clip}
    for name, lin in act_linear_names(layer, adapter, config, f"{adapter.layers_path}.{idx}").items():
        lin.act = spec
        out[name] = {"act_clip": spec.clip}
    return out


class _Capture:
    """Forward pre-hooks recording the unmasked inputs of the layer's act targets (float32, on ``store``):
    experts ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` per call, linears ``x [T, K]``."""

    def __init__(self, experts: nn.Module | None, linears: dict[str, QuantizedLinear], store):
        self.store, self.mask = store, None
        self.experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.linears: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
        self._handles = [m.register_forward_pre_hook(self._linear_hook(n)) for n, m in linears.items()]
        if experts is not None:
            self._handles.append(experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True))

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.mask is None else t[self.mask.to(t.device) > 0]

    def _experts_hook(self, module, args, kwargs):
        vals = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        h, idx, w = vals[:3]
        self.experts.append(tuple(self._keep(t).to(self.store) for t in (h, idx, w)))

    def _linear_hook(self, name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            self.linears[name].append(self._keep(x).to(self.store))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _sq_error(fn, ref: list[torch.Tensor], inputs: list) -> float:
    return float(sum((fn(*x).float() - r).pow(2).sum() for x, r in zip(inputs, ref)))


def search_clip(fn_for_clip, ref: list[torch.Tensor], inputs: list, grid) -> tuple[float, dict[float, float]]:
    """The ratio of ``grid`` minimizing the summed squared error of ``fn_for_clip(clip)(*x)`` against ``ref``
    over ``inputs`` (ties to the larger ratio), and every ratio's error."""
    errs = {}
    best = None
    for c in sorted({float(c) for c in grid}, reverse=True):
        errs[c] = _sq_error(fn_for_clip(c), ref, inputs)
        if best is None or errs[c] < errs[best]:
            best = c
    return best, errs


@torch.no_grad()
def search_experts_clips(experts: nn.Module, caps: list, base: ActSpec, grid, device) -> dict:
    """``act13`` then ``act2`` clips of one quantized experts module on captured calls ``caps``; the chosen
    specs are left set on the module. Returns the choice and the errors (absmax = ratio 1.0 for reference)."""
    inputs = [tuple(t.to(device) for t in c) for c in caps]

    def run(a13, a2):
        def f(h, idx, w):
            experts.set_act_specs(a13, a2)
            return experts(h, idx, w)
        return f

    ref = [run(None, None)(*x).float() for x in inputs]
    c13, e13 = search_clip(lambda c: run(base.with_clip(c), None), ref, inputs, grid)
    c2, e2 = search_clip(lambda c: run(base.with_clip(c13), base.with_clip(c)), ref, inputs, grid)
    experts.set_act_specs(base.with_clip(c13), base.with_clip(c2))
    return {"act13_clip": c13, "act2_clip": c2, "act13_sq_error": _keys(e13), "act2_sq_error": _keys(e2),
            "tokens": int(sum(x[0].shape[0] for x in inputs))}


@torch.no_grad()
def search_linear_clip(linear: QuantizedLinear, xs: list[torch.Tensor], base: ActSpec, grid, device) -> dict:
    inputs = [(x.to(device),) for x in xs]

    def run(spec):
        def f(x):
            linear.act = spec
            return linear(x)
        return f

    ref = [run(None)(*x).float() for x in inputs]
    c, errs = search_clip(lambda c: run(base.with_clip(c)), ref, inputs, grid)
    linear.act = base.with_clip(c)
    return {"act_clip": c, "act_sq_error": _keys(errs)}


@torch.no_grad()
def calibrate_layer_act(layer: nn.Module, adapter: MoEAdapter, config: QuantConfig, idx: int, inputs, device) -> dict:
    """Pick the activation clips of ONE quantized decoder layer on its captured calibration inputs.

    Args:
        layer: decoder layer ``idx`` with its experts (and the act linears) already quantized, on ``device``.
        inputs: ``moeq.runner.LayerInputs`` of the layer (hidden ``[1, L, H]`` per sample, kwargs, masks ``[L]``).
    Sets the chosen specs on the modules and returns ``{module name: choice and per-ratio errors}``.
    """
    from moeq.runner import iter_layer

    base = config.act_spec()
    experts = _layer_experts(layer, adapter)
    linears = act_linear_names(layer, adapter, config, f"{adapter.layers_path}.{idx}")
    if experts is None and not linears:
        return {}
    if experts is not None:
        experts.set_act_specs(None, None)
    for lin in linears.values():
        lin.act = None
    store = torch.device("cpu") if torch.device(device).type == "cpu" else device
    cap = _Capture(experts, linears, store)
    try:
        def on_sample(j):
            cap.mask = inputs.masks[j]
        for _ in iter_layer(layer, inputs, device, on_sample=on_sample):
            pass  # the hooks captured the inputs; the outputs are not needed
    finally:
        cap.remove()
    out = {}
    if experts is not None:
        name = adapter.experts_name(idx)
        out[name] = search_experts_clips(experts, cap.experts, base, config.act_clip_grid, device)
        logger.info("%s: activation clips gate_up %.2f, down %.2f (%s, %d tokens)", name, out[name]["act13_clip"],
                    out[name]["act2_clip"], _fmt(base), out[name]["tokens"])
    for name, lin in linears.items():
        out[name] = search_linear_clip(lin, cap.linears[name], base, config.act_clip_grid, device)
        logger.info("%s: activation clip %.2f (%s)", name, out[name]["act_clip"], _fmt(base))
    return out


def _keys(errs: dict[float, float]) -> dict[str, float]:
    """JSON object keys are strings: the per-ratio errors as ``{"0.9": err}``."""
    return {f"{c:g}": e for c, e in errs.items()}


def _fmt(spec: ActSpec) -> str:
    return "fp8 e4m3" if spec.format == "fp8_e4m3" else f"int{spec.bits}"


@torch.no_grad()
def calibrate_act(model: nn.Module, adapter: MoEAdapter, config: QuantConfig, calib, device=None) -> dict:
    """Activation specs for a quantized ``model``: searched per layer (``act_clip_search``, needs ``calib``) or
    ``act_clip`` everywhere. Returns the calibration record (per-module clips; errors when searched)."""
    if config.act_bits is None:
        return {}
    if not config.act_clip_search:
        return {"clip_search": False, "modules": apply_act_specs(model, adapter, config)}
    if calib is None:
        raise ValueError("act_clip_search needs calibration data (calib=...)")
    from moeq.runner import _non_layer_modules, capture_inputs, run_layer
    from moeq.smoothing import calib_tensors

    ids, mask = calib_tensors(calib)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    store = torch.device("cpu") if device.type == "cpu" else device
    inputs = capture_inputs(model, adapter, ids, mask, device, store)
    layers = adapter.layers(model)
    modules = {}
    try:
        for i in range(len(layers)):
            layer = layers[i].to(device)
            modules.update(calibrate_layer_act(layer, adapter, config, i, inputs, device))
            if i + 1 < len(layers):
                inputs.hidden = run_layer(layer, inputs, device, store)
            layers[i].to(home)
    finally:
        for m in _non_layer_modules(model, adapter):
            m.to(home)
    return {"clip_search": True, "grid": sorted({float(c) for c in config.act_clip_grid}, reverse=True),
            "modules": modules}
