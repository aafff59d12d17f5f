"""Router-logit alignment (EAQuant): choose each router's 8-bit clipping ratio by what it does to routing.

Plain 8-bit rounding of a router (:func:`moeq.quantize_linear.round_router`) uses a symmetric per-output-channel
grid with scale ``absmax / 127``. Here each router gets one clipping ratio ``p`` from a grid (1.0 down to 0.5):
the grid step becomes ``p * absmax / 127`` (values beyond are clamped), and ``p`` is chosen on calibration
tokens (the MoE block's input hidden states, one layer at a time, full-precision model) to minimize

    KL(r_fp || r_q),  r[e] = w_e / sum_j w_j for the top-k experts e, 0 elsewhere,

the divergence of the renormalized top-k routing distributions of the FP and the quantized router (``w`` the
routing weights the router returns; ``r_q`` is mixed with ``1e-6`` uniform mass so an expert the quantized
router drops costs ``r_fp[e] * log(r_fp[e] / 1e-6)`` instead of infinity). Only ratios whose mean top-k
agreement (``|topk_q ∩ topk_fp| / k``) is at least absmax's are eligible, and ties go to the larger ratio, so
on the calibration tokens the result is never worse than absmax on either number; ``p = 1`` *is* absmax.

Without calibration data (RTN without ``calib``) moeq keeps plain absmax rounding.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.func import functional_call

from moeq.models import MoEAdapter
from moeq.runner import observe_layer
from moeq.smoothing import layerwise_pass

logger = logging.getLogger(__name__)

CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5
_FLOOR = 1e-6


def round_router_weight(w: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
    """``w [E, H]`` on the symmetric 8-bit per-row grid with step ``ratio * absmax / 127`` (same dtype);
    ``ratio=1`` equals :func:`moeq.quantize_linear.round_router`."""
    s = (w.float().abs().amax(-1, keepdim=True) * ratio / 127).clamp_min(1e-12)
    return (torch.round(w.float() / s).clamp(-127, 127) * s).to(w.dtype)


def routing_distribution(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Renormalized top-k routing ``[T, E]`` float64 from routing weights / indices ``[T, k]``."""
    w = weights.reshape(-1, weights.shape[-1]).double()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.zeros(w.shape[0], num_experts, dtype=torch.float64, device=w.device).scatter_(
        1, indices.reshape(w.shape), w)


def routing_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q~)`` per token ``[T]`` with ``q~ = (q + 1e-6) / (1 + E 1e-6)`` (``p, q [T, E]`` rows sum to 1)."""
    q = (q + _FLOOR) / (1 + q.shape[-1] * _FLOOR)
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p))
    return terms.sum(-1)


def topk_agreement(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """``|a ∩ b| / k`` per token ``[T]`` for expert index sets ``[T, k]``."""
    a, b = idx_a.reshape(-1, idx_a.shape[-1]), idx_b.reshape(-1, idx_b.shape[-1])
    return (a[:, :, None] == b[:, None, :]).any(-1).double().mean(-1)


class _RouterProbe:
    """Accumulates, per candidate ratio, the summed KL and top-k agreement of one router over the block's
    input tokens (padding excluded)."""

    def __init__(self, router: nn.Module, block: nn.Module, grid: tuple[float, ...]):
        self.router, self.grid = router, grid
        w = router.weight.detach()
        self.candidates = [round_router_weight(w, p) for p in grid]
        self.kl = torch.zeros(len(grid), dtype=torch.float64)
        self.agree = torch.zeros(len(grid), dtype=torch.float64)
        self.tokens = 0
        self.mask: torch.Tensor | None = None
        self._handle = block.register_forward_pre_hook(self._hook, with_kwargs=True)

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask.reshape(-1) > 0

    def remove(self) -> None:
        self._handle.remove()

    @torch.no_grad()
    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x.reshape(-1, x.shape[-1])[self.mask if self.mask is not None else slice(None)]
        if x.shape[0] == 0:
            return
        _, w_fp, i_fp = self.router(x)
        e = self.router.weight.shape[0]
        r_fp = routing_distribution(w_fp, i_fp, e)
        for c, wq in enumerate(self.candidates):
            _, w_q, i_q = functional_call(self.router, {"weight": wq}, (x,))
            self.kl[c] += float(routing_kl(r_fp, routing_distribution(w_q, i_q, e)).sum())
            self.agree[c] += float(topk_agreement(i_fp, i_q).sum())
        self.tokens += x.shape[0]

    def choose(self) -> dict:
        """Pick the ratio (see module docstring), write it into the router; returns the layer's record."""
        n = max(self.tokens, 1)
        kl, agree = (self.kl / n).tolist(), (self.agree / n).tolist()
        base = self.grid.index(1.0)
        eligible = [c for c in range(len(self.grid)) if agree[c] >= agree[base]]
        best = min(eligible, key=lambda c: (kl[c], -self.grid[c]))
        self.router.weight.data.copy_(self.candidates[best])
        return {"clip_ratio": self.grid[best], "tokens": self.tokens,
                "kl_absmax": kl[base], "kl_aligned": kl[best],
                "agreement_absmax": agree[base], "agreement_aligned": agree[best]}


def router_name(adapter: MoEAdapter, idx: int) -> str:
    return f"{adapter.layers_path}.{idx}.{adapter.mlp_attr}.{adapter.router_attr}"


@torch.no_grad()
def align_routers(model: nn.Module, adapter: MoEAdapter, calib, device=None,
                  grid: tuple[float, ...] = CLIP_GRID) -> dict[str, dict]:
    """Round every router of ``model`` to 8 bits in place with its KL-chosen clipping ratio.

    Args:
        calib: token ids int64 ``[n, L]`` or a dict with ``input_ids`` / ``attention_mask`` ``[n, L]``.
        device: compute device (layers move there one at a time).
        grid: candidate ratios; must contain 1.0 (absmax, the reference).
    Returns ``{router module name: {"clip_ratio", "tokens", "kl_absmax", "kl_aligned", "agreement_absmax",
    "agreement_aligned"}}`` (means over calibration tokens). Later layers are fed the full-precision-router
    outputs of earlier ones (the rounding is applied after each layer's pass).
    """
    if 1.0 not in grid:
        raise ValueError("the clipping grid must contain 1.0 (absmax rounding, the reference)")
    grid = tuple(sorted(grid, reverse=True))
    out: dict[str, dict] = {}

    def begin(idx, layer, block):
        return _RouterProbe(adapter.router(block), block, grid)

    def end(idx, layer, block, probe: _RouterProbe):
        out[router_name(adapter, idx)] = _choose(probe, adapter, idx)

    layerwise_pass(model, adapter, calib, device, begin, end)
    return out


def _choose(probe: _RouterProbe, adapter: MoEAdapter, idx: int) -> dict:
    rec = probe.choose()
    logger.info("%s: 8-bit clip %.2f, routing KL %.3e -> %.3e, top-k agreement %.4f -> %.4f (%d tokens)",
                router_name(adapter, idx), rec["clip_ratio"], rec["kl_absmax"], rec["kl_aligned"],
                rec["agreement_absmax"], rec["agreement_aligned"], rec["tokens"])
    return rec


@torch.no_grad()
def align_router_layer(layer: nn.Module, idx: int, adapter: MoEAdapter, inputs, device,
                       grid: tuple[float, ...] = CLIP_GRID) -> dict | None:
    """Round one layer's router to 8 bits with its KL-chosen clipping ratio from calibration ``inputs``
    (:class:`moeq.runner.LayerInputs`); returns its record (None without a router). The per-layer form of
    :func:`align_routers` used by the streaming pipeline."""
    block = adapter.moe_block(layer)
    if block is None:
        return None
    if 1.0 not in grid:
        raise ValueError("the clipping grid must contain 1.0 (absmax rounding, the reference)")
    probe = _RouterProbe(adapter.router(block), block, tuple(sorted(grid, reverse=True)))
    observe_layer(layer, inputs, device, probe)
    return _choose(probe, adapter, idx)
