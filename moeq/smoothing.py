"""EAQuant-style smoothing of MoE layers: expert-aware aggregated input scales and per-expert down scales.

Input smoothing. In a MoE layer the post-attention RMSNorm output ``x [T, H]`` is read by the router, the
shared expert (and its sigmoid gate) and every routed expert's ``gate_up [2I, H]``. SmoothQuant moves
activation outliers into the weights with a per-channel ``s [H]``: ``x' = x / s``, ``W' = W diag(s)``, exactly
(``x' W'^T = x W^T``), and ``x / s`` is folded into the norm (``g <- g / s``). Because every reader sees the
*same* ``x'``, one vector per layer must serve all experts. Per routed expert ``e`` (statistics over the tokens
routed to it only, captured inside the experts dispatch so inputs and routing are the same tokens)::

    s_e[c] = max_t |x_e[t, c]| ** alpha / max_r |gate_up_e[r, c]| ** (1 - alpha)

and, when the block has a shared expert, a dense term ``s_0`` from all tokens and the weight rows of every
all-token reader (shared gate/up, router, shared-expert gate). Aggregation (``n_e`` = routed tokens of expert
``e``, ``pi_e`` = its summed softmax router probability, ``N`` = tokens; the shared expert counts as an expert
every token visits with weight 1, i.e. ``n_0 = pi_0 = N``; experts with no token are left out)::

    max:         s = max(s_0, max_e s_e)                  (elementwise)
    frequency:   s = (N s_0 + sum_e n_e  s_e) / (N + sum_e n_e)
    router_prob: s = (N s_0 + sum_e pi_e s_e) / (N + sum_e pi_e)

Channels no token ever activated keep ``s = 1``.

Down smoothing (``down_proj=True``). The down input ``h = silu(gate) * up`` is linear in ``up``, so per expert
``s_d [I]`` from the expert's own ``h`` (same formula with ``down_e [H, I]``) folds exactly:
``up rows /= s_d``, ``down[:, c] *= s_d[c]``. Shared experts likewise (``up_proj`` / ``down_proj``).

Composition with rotation (``QuantConfig(rotation="hadamard", smooth=True)``, :func:`moeq.quantize_model`):
rotation first (norms fused into their readers, residual stream rotated by ``Q``, no online Hadamard yet), then
this smoothing on the rotated model, then the offline half of the online Hadamard on the smoothed down weights.
Why this order: smoothing *before* rotation is undone exactly by the norm fusion (``W diag(s)`` with norm ``g / s``
fuses back to ``W diag(g)``), and ``Q`` is applied to the residual stream, before the norm, so a "divide by
``s`` then rotate" on the norm output would need an extra online rotation after every norm. After rotation the
post-attention norm weight is 1 and becomes ``1 / s``: the routed experts read ``RMSNorm(x Q) / s`` (rotate, then
smooth, the order of OSTQuant's ``Q`` then scaling). The down input is never touched by ``Q``, so there the
order is smooth, then rotate (``(h / s_d) H_I`` against ``W diag(s_d) H_I``), the order of DuQuant, which EAQuant's
public code builds on (its ``smooth_lm`` folds the scales before the rotation wrappers). Every step is an exact
identity in float, so the composed model computes the same function before quantization
(``tests/moeq/test_smoothing.py``).

All folding runs in float64 and is rounded once to each weight's dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moeq.config import SMOOTH_AGGREGATIONS
from moeq.models import MoEAdapter
from moeq.runner import capture_inputs, observe_layer

logger = logging.getLogger(__name__)

_EPS = 1e-5  # floor of activation / weight maxima: SmoothQuant's clamp, keeps s finite


@dataclass
class SmoothReport:
    """What :func:`smooth_model` did: per experts module name, summary numbers of the folded scales."""

    alpha: float
    aggregation: str
    down_proj: bool
    layers: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "aggregation": self.aggregation, "down_proj": self.down_proj,
                "layers": self.layers}


# ---- scale formulas ------------------------------------------------------------------------------------------
def smooth_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant scales ``act_max ** alpha / w_max ** (1 - alpha)`` (float64, same shape), maxima floored."""
    a, w = act_max.double().clamp_min(_EPS), w_max.double().clamp_min(_EPS)
    return a.pow(alpha) / w.pow(1 - alpha)


def aggregate_scales(s_experts: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor, how: str,
                     s_dense: torch.Tensor | None = None, dense_weight: float = 0.0) -> torch.Tensor:
    """One ``[H]`` scale vector from per-expert scales ``s_experts [E, H]`` (see module docstring).

    ``counts [E]``: routed tokens per expert (experts with 0 are left out); ``probs [E]``: summed router
    probabilities; ``s_dense [H]`` with weight ``dense_weight`` (the token count ``N``): the shared expert term.
    """
    if how not in SMOOTH_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {SMOOTH_AGGREGATIONS}, got {how!r}")
    used = counts > 0
    s, w = s_experts[used].double(), (counts if how == "frequency" else probs)[used].double()
    if s_dense is not None:
        s = torch.cat([s, s_dense.double()[None]])
        w = torch.cat([w, w.new_tensor([dense_weight])])
    if s.shape[0] == 0:
        raise ValueError("no calibration token reached this layer's experts: cannot compute smoothing scales")
    if how == "max":
        return s.amax(0)
    return (w[:, None] * s).sum(0) / w.sum().clamp_min(1e-30)


# ---- statistics ----------------------------------------------------------------------------------------------
class _LayerStats:
    """Activation maxima of one MoE block over the calibration tokens (padding excluded), all float32.

    ``x_max [E, H]`` per expert over its routed tokens, ``x_all [H]`` over all tokens, ``h_max [E, I]`` of each
    expert's down input, ``shared_h [I_s]`` of the shared expert's down input, ``counts [E]`` routed tokens,
    ``probs [E]`` summed softmax router probabilities, ``tokens`` = N.
    """

    def __init__(self, adapter: MoEAdapter, block: nn.Module, down: bool, device):
        self.adapter, self.block, self.down = adapter, block, down
        ex = adapter.experts(block)
        e, two_i, h = ex.gate_up_proj.shape
        self.act = getattr(ex, "act_fn", F.silu)
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)
        self.x_max, self.x_all, self.h_max = z(e, h), z(h), z(e, two_i // 2)
        self.counts, self.probs, self.tokens = z(e), z(e), 0
        self.shared_h = None
        self.mask: torch.Tensor | None = None
        self._handles = [ex.register_forward_pre_hook(self._experts_hook, with_kwargs=True)]
        shared = adapter.shared_expert(block)
        if down and shared is not None:
            self.shared_h = z(shared.down_proj.in_features)
            self._handles.append(shared.down_proj.register_forward_pre_hook(self._shared_down_hook))

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1) > 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _shared_down_hook(self, module, args):
        h = args[0].reshape(-1, args[0].shape[-1])[self.mask if self.mask is not None else slice(None)]
        if h.shape[0]:
            self.shared_h = torch.maximum(self.shared_h, h.abs().amax(0).float())

    @torch.no_grad()
    def _experts_hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        keep = self.mask if self.mask is not None else slice(None)
        x, idx = hidden[keep], idx[keep]
        if x.shape[0] == 0:
            return
        self.tokens += x.shape[0]
        self.x_all = torch.maximum(self.x_all, x.abs().amax(0).float())
        logits = self.adapter.router(self.block)(x)[0]
        self.probs += F.softmax(logits.float(), dim=-1).sum(0)
        gate_up = module.gate_up_proj
        for e in torch.unique(idx).tolist():
            xe = x[(idx == e).any(-1)]
            self.counts[e] += xe.shape[0]
            self.x_max[e] = torch.maximum(self.x_max[e], xe.abs().amax(0).float())
            if self.down:
                gate, up = F.linear(xe, gate_up[e]).chunk(2, dim=-1)
                self.h_max[e] = torch.maximum(self.h_max[e], (self.act(gate) * up).abs().amax(0).float())


# ---- folding -------------------------------------------------------------------------------------------------
def _scale_cols(w: torch.Tensor, s: torch.Tensor) -> None:
    """``w [..., N, K]`` <- ``w diag(s)`` (``s [K]`` float64, or ``[E, K]`` for a 3-D stack)."""
    s = s.to(w.device)
    w.data.copy_((w.double() * (s if s.dim() == 1 else s[:, None, :])).to(w.dtype))


def _dense_readers(adapter: MoEAdapter, block: nn.Module) -> list[torch.Tensor]:
    """Weights ``[N, H]`` of the all-token readers of the MoE input: router, shared gate/up, shared gate."""
    out = [adapter.router(block).weight]
    shared, gate = adapter.shared_expert(block), adapter.shared_gate(block)
    if shared is not None:
        out += [shared.gate_proj.weight, shared.up_proj.weight]
    if gate is not None:
        out.append(gate.weight)
    return out


def _input_scales(stats: _LayerStats, adapter: MoEAdapter, block: nn.Module, alpha: float, how: str) -> torch.Tensor:
    gate_up = adapter.experts(block).gate_up_proj
    s_e = smooth_scales(stats.x_max, gate_up.detach().abs().amax(1), alpha)  # [E, H]
    s_0 = None
    if adapter.shared_expert(block) is not None:
        w0 = torch.cat([w.detach().abs() for w in _dense_readers(adapter, block)]).amax(0)
        s_0 = smooth_scales(stats.x_all, w0.to(stats.x_all.device), alpha)
    s = aggregate_scales(s_e.to(stats.x_all.device), stats.counts, stats.probs, how, s_0, float(stats.tokens))
    return torch.where(stats.x_all.double() > 0, s, torch.ones_like(s))  # dead channels: nothing to smooth


@torch.no_grad()
def fold_input_scales(adapter: MoEAdapter, norm: nn.Module, block: nn.Module, s: torch.Tensor) -> None:
    """``norm.weight /= s``; every reader of the norm output (router, shared gate, routed gate_up, shared
    gate/up) ``W[:, c] *= s[c]``. ``s [H]`` float64. The block's function is unchanged."""
    norm.weight.data.copy_((norm.weight.double() / s.to(norm.weight.device)).to(norm.weight.dtype))
    for w in _dense_readers(adapter, block) + [adapter.experts(block).gate_up_proj]:
        _scale_cols(w, s)


@torch.no_grad()
def fold_down_scales(adapter: MoEAdapter, block: nn.Module, s_experts: torch.Tensor | None,
                     s_shared: torch.Tensor | None) -> None:
    """Routed: ``up rows (gate_up[e][I:]) /= s_experts[e]``, ``down[e][:, c] *= s_experts[e, c]``
    (``s_experts [E, I]`` float64); shared: ``up_proj`` rows (and bias) ``/= s_shared``, ``down_proj`` columns
    ``*= s_shared``. Exact because ``silu(gate) * up`` is linear in ``up``."""
    if s_experts is not None:
        ex = adapter.experts(block)
        inter = ex.down_proj.shape[-1]
        up = ex.gate_up_proj.data[:, inter:]
        up.copy_((up.double() / s_experts.to(up.device)[:, :, None]).to(up.dtype))
        _scale_cols(ex.down_proj, s_experts)
    shared = adapter.shared_expert(block)
    if s_shared is not None and shared is not None:
        s = s_shared.to(shared.up_proj.weight.device)
        for p in (shared.up_proj.weight, shared.up_proj.bias):
            if p is not None:
                p.data.copy_((p.double() / (s[:, None] if p.dim() == 2 else s)).to(p.dtype))
        _scale_cols(shared.down_proj.weight, s)


def _down_scales(stats: _LayerStats, adapter: MoEAdapter, block: nn.Module, alpha: float):
    ex = adapter.experts(block)
    s_e = smooth_scales(stats.h_max, ex.down_proj.detach().abs().amax(1).to(stats.h_max.device), alpha)  # [E, I]
    # experts without tokens, and channels never active, stay unscaled
    s_e = torch.where(stats.h_max.double() > 0, s_e, torch.ones_like(s_e))
    s_sh = None
    if stats.shared_h is not None:
        shared = adapter.shared_expert(block)
        s_sh = smooth_scales(stats.shared_h, shared.down_proj.weight.detach().abs().amax(0).to(stats.shared_h.device), alpha)
        s_sh = torch.where(stats.shared_h.double() > 0, s_sh, torch.ones_like(s_sh))
    return s_e, s_sh


# ---- the calibration pass ------------------------------------------------------------------------------------
def calib_tensors(calib) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids [n, L] int64, attention_mask [n, L] or None)`` from ``calib`` (a tensor or a dict)."""
    from moeq.methods import _calib_tensors

    return _calib_tensors(calib)


@torch.no_grad()
def layerwise_pass(model: nn.Module, adapter: MoEAdapter, calib, device, begin, end) -> None:
    """Run the calibration tokens through the decoder layers one at a time (only that layer on ``device``).

    For every MoE layer ``state = begin(idx, layer, block)`` installs hooks (``state.set_mask(mask [L])`` is
    called before each sample) and ``end(idx, layer, block, state)`` runs after all samples, before the next
    layer. Layers after the last MoE layer are not run. ``end`` may change the layer only in ways that keep its
    function (the outputs computed before ``end`` feed the next layer).
    """
    ids, mask = calib_tensors(calib)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    store = torch.device("cpu") if device.type == "cpu" else device
    inputs = capture_inputs(model, adapter, ids, mask, device, store)
    layers = adapter.layers(model)
    last = max(i for i, _ in adapter.moe_layers(model))
    try:
        for i in range(last + 1):
            layer = layers[i].to(device)
            block = adapter.moe_block(layer)
            state = begin(i, layer, block) if block is not None else None
            outs = []
            try:
                for j, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
                    if state is not None:
                        state.set_mask(inputs.masks[j].to(device))
                    y = layer(h.to(device), **kw)
                    outs.append((y[0] if isinstance(y, tuple) else y).to(store))
            finally:
                if state is not None:
                    state.remove()
            if state is not None:
                end(i, layer, block, state)
            inputs.hidden = outs
            layers[i].to(home)
    finally:
        base = model.get_submodule(adapter.layers_path.rpartition(".")[0])
        for m in base.children():
            if m is not layers:
                m.to(home)


@torch.no_grad()
def smooth_model(model: nn.Module, adapter: MoEAdapter, calib, alpha: float = 0.5, aggregation: str = "max",
                 down_proj: bool = True, device=None) -> SmoothReport:
    """Smooth every MoE layer of a full-precision ``model`` in place (see the module docstring).

    Args:
        calib: calibration token ids int64 ``[n, L]``, or a dict with ``input_ids`` and ``attention_mask``
            ``[n, L]`` (padding is left out of every statistic).
        alpha: migration strength in ``[0, 1]`` (0: no input smoothing of activations, 1: all onto weights).
        aggregation: ``max`` | ``frequency`` | ``router_prob``.
        down_proj: also smooth each routed (and shared) expert's down-projection input.
        device: compute device (layers move there one at a time); default the model's.
    Returns a :class:`SmoothReport`. The model computes the same function (up to rounding to its dtype).
    """
    if aggregation not in SMOOTH_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {SMOOTH_AGGREGATIONS}, got {aggregation!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for idx, block in adapter.moe_layers(model):
        if not hasattr(adapter.experts(block), "gate_up_proj"):
            raise ValueError(f"{adapter.experts_name(idx)} is already quantized: smooth before quantizing")
    report = SmoothReport(alpha, aggregation, down_proj)

    def begin(idx, layer, block):
        return _LayerStats(adapter, block, down_proj, next(layer.parameters()).device)

    def end(idx, layer, block, stats: _LayerStats):
        report.layers[adapter.experts_name(idx)] = _fold_layer(stats, adapter, idx, layer, block, alpha, aggregation,
                                                               down_proj)

    layerwise_pass(model, adapter, calib, device, begin, end)
    return report


def _fold_layer(stats: _LayerStats, adapter: MoEAdapter, idx: int, layer: nn.Module, block: nn.Module, alpha: float,
                aggregation: str, down_proj: bool) -> dict:
    """Fold the scales of one layer's statistics; returns its report entry."""
    s = _input_scales(stats, adapter, block, alpha, aggregation)
    fold_input_scales(adapter, getattr(layer, adapter.post_attn_norm_attr), block, s)
    entry = {"tokens": stats.tokens, "experts_with_tokens": int((stats.counts > 0).sum()),
             "scale_min": float(s.min()), "scale_max": float(s.max())}
    if down_proj:
        s_e, s_sh = _down_scales(stats, adapter, block, alpha)
        fold_down_scales(adapter, block, s_e, s_sh)
        entry["down_scale_max"] = float(s_e.max())
    logger.info("%s smoothed (alpha %.2f, %s): input scales in [%.3g, %.3g]", adapter.experts_name(idx), alpha,
                aggregation, entry["scale_min"], entry["scale_max"])
    return entry


@torch.no_grad()
def smooth_layer(layer: nn.Module, idx: int, adapter: MoEAdapter, inputs, device, alpha: float = 0.5,
                 aggregation: str = "max", down_proj: bool = True) -> dict | None:
    """Smooth one decoder layer in place from its calibration ``inputs`` (:class:`moeq.runner.LayerInputs`,
    on ``device``); returns its report entry (None for a layer without routed experts). The per-layer form of
    :func:`smooth_model` used by the streaming pipeline."""
    block = adapter.moe_block(layer)
    if block is None:
        return None
    stats = _LayerStats(adapter, block, down_proj, next(layer.parameters()).device)
    observe_layer(layer, inputs, device, stats)
    return _fold_layer(stats, adapter, idx, layer, block, alpha, aggregation, down_proj)
