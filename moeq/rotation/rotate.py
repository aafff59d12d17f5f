"""Rotate a MoE model's residual stream with a random orthogonal Hadamard matrix ``Q`` (QuaRot).

With every RMSNorm scale folded into the linears that read it (:mod:`moeq.rotation.fuse`), an RMSNorm
commutes with ``Q`` (``rms(x Q) = rms(x)``), so the model computes the same function when
- the embedding rows and every residual *writer* (``o_proj``, routed and shared ``down``) output ``x Q``:
  ``E <- E Q``, ``W <- Q^T W`` (``W [H, K]``, and ``b <- Q^T b``);
- every residual *reader* (attention inputs, the **router**, ``shared_expert_gate``, routed and shared
  ``gate_up``, ``lm_head``) reads ``x Q``: ``W <- W Q`` (``W [N, H]``).
Rotating the router keeps routing identical, so experts see the same tokens. ``Q = diag(s) H_n / sqrt(n)``
with random signs ``s`` (seeded) and ``H_n`` from :func:`moeq_kernels.hadamard.hadamard_matrix`.

Online Hadamard (``online_hadamard=True``): every routed expert's down projection becomes ``W_down H_I``
(``H_I`` orthonormal, symmetric, no random signs) and its input is multiplied by ``H_I`` at run time
(``QuantizedExperts.online_hadamard``), spreading outliers of the SiLU*up activations before the 4-bit down
GEMM. All arithmetic runs in float64 and is rounded once to the weights' dtype.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from moeq.models import MoEAdapter
from moeq.rotation.fuse import fuse_final_norm, fuse_layer_norms
from moeq_kernels.hadamard import hadamard_factors, hadamard_matrix

logger = logging.getLogger(__name__)

ROTATIONS = ("hadamard",)


class RotationError(ValueError):
    """The model cannot be rotated (unsupported dimension, already quantized, ...)."""


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Orthogonal ``Q = diag(s) H_n / sqrt(n)`` in float64 ``[n, n]``, ``s`` random signs from ``seed``."""
    try:
        hadamard_factors(n)
    except ValueError as exc:
        raise RotationError(f"hidden size {n}: {exc}") from exc
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64) * 2 - 1
    return signs.to(torch.float64).unsqueeze(1) * hadamard_matrix(n) / math.sqrt(n)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


@torch.no_grad()
def _read(w: torch.Tensor, q: torch.Tensor) -> None:
    """Reader weight ``[..., N, H]`` <- ``W Q``."""
    _set(w, w.double() @ q.to(w.device))


@torch.no_grad()
def _write(w: torch.Tensor, q: torch.Tensor) -> None:
    """Writer weight ``[..., H, K]`` <- ``Q^T W``."""
    _set(w, q.to(w.device).T @ w.double())


def _linears(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear]:
    return [getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Linear)]


def _mlp_linears(mlp: nn.Module) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """(readers, writers) of a dense gated MLP (gate_proj/up_proj -> down_proj)."""
    return _linears(mlp, ("gate_proj", "up_proj")), _linears(mlp, ("down_proj",))


def _rotate_layer(layer: nn.Module, adapter: MoEAdapter, q: torch.Tensor) -> None:
    attn = getattr(layer, adapter.attn_attr)
    readers = [m.weight for m in _linears(attn, adapter.attn_readers)]
    writers = _linears(attn, adapter.attn_writers)
    block = adapter.moe_block(layer)
    mlps = [getattr(layer, adapter.mlp_attr)] if block is None else [m for m in [adapter.shared_expert(block)] if m is not None]
    for mlp in mlps:
        r, w = _mlp_linears(mlp)
        readers += [m.weight for m in r]
        writers += w
    if block is not None:
        experts = adapter.experts(block)
        readers += [adapter.router(block).weight, experts.gate_up_proj]
        gate = adapter.shared_gate(block)
        if gate is not None:
            readers.append(gate.weight)
        _write(experts.down_proj, q)
    for w in readers:
        _read(w, q)
    for m in writers:
        _write(m.weight, q)
        if m.bias is not None:
            _set(m.bias, q.to(m.bias.device).T @ m.bias.double())


@torch.no_grad()
def _online_hadamard_down(block: nn.Module, adapter: MoEAdapter) -> None:
    """Routed experts' ``down_proj [E, H, I]`` <- ``W H_I / sqrt(I)`` (the runtime applies ``x H_I / sqrt(I)``)."""
    down = adapter.experts(block).down_proj
    inter = down.shape[-1]
    try:
        h = hadamard_matrix(inter, device=down.device) / math.sqrt(inter)
    except ValueError as exc:
        raise RotationError(f"expert intermediate size {inter}: {exc}") from exc
    _set(down, down.double() @ h)


def check_unquantized(model: nn.Module, adapter: MoEAdapter) -> None:
    for idx, block in adapter.moe_layers(model):
        if not hasattr(adapter.experts(block), "gate_up_proj"):
            raise RotationError(f"{adapter.experts_name(idx)} is already quantized: rotate before quantizing")


def rotation_for(model: nn.Module, seed: int) -> torch.Tensor:
    """The residual-stream rotation ``Q [H, H]`` float64 of ``model`` (random-sign Hadamard, ``seed``)."""
    return random_hadamard(model.config.hidden_size, seed)


@torch.no_grad()
def rotate_outer(model: nn.Module, adapter: MoEAdapter, q: torch.Tensor, embed: bool = True, head: bool = True) -> None:
    """The non-layer part of rotation: untie lm_head, ``embed <- embed Q``, fold the final norm into lm_head
    and ``lm_head <- lm_head Q`` (``embed`` / ``head`` select the halves, for a pipeline that holds only one)."""
    emb, lm_head = model.get_submodule(adapter.embed_path), model.get_submodule(adapter.lm_head_path)
    if lm_head.weight is emb.weight:
        logger.warning("untying lm_head from the input embedding: the final norm's scale is folded into lm_head")
        lm_head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if embed:
        _set(emb.weight, emb.weight.double() @ q.to(emb.weight.device))
    if head:
        fuse_final_norm(model, adapter)
        _read(lm_head.weight, q)


@torch.no_grad()
def rotate_layer(layer: nn.Module, adapter: MoEAdapter, q: torch.Tensor, online_hadamard: bool) -> None:
    """Rotate one decoder layer in place: fold its norms, rotate its readers and writers by ``q``, and (MoE
    layers, ``online_hadamard``) fold ``H_I`` into the routed down projections."""
    fuse_layer_norms(layer, adapter)
    _rotate_layer(layer, adapter, q)
    block = adapter.moe_block(layer)
    if online_hadamard and block is not None:
        _online_hadamard_down(block, adapter)


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: MoEAdapter, seed: int = 0, online_hadamard: bool = True) -> None:
    """Fuse norms and rotate ``model`` (full precision, before quantization) in place; see module docstring.

    Raises :class:`RotationError` when a dimension has no supported Hadamard order or the model already
    holds quantized experts. Tied input/output embeddings are untied (lm_head gets its own copy), because the
    final norm's scale is folded into lm_head only. Every step touches its own tensors, so this equals
    :func:`rotate_outer` + :func:`rotate_layer` per layer (what the streaming pipeline runs).
    """
    check_unquantized(model, adapter)
    q = rotation_for(model, seed)
    rotate_outer(model, adapter, q)
    for layer in adapter.layers(model):
        rotate_layer(layer, adapter, q, online_hadamard)


@torch.no_grad()
def apply_online_hadamard(model: nn.Module, adapter: MoEAdapter) -> None:
    """The offline half of the online Hadamard on every routed expert's down input (``W_down <- W_down H_I``).
    Smoothing composed with rotation calls it after folding the down smoothing scales (rotation itself then
    runs with ``online_hadamard=False``), so the runtime rotates the smoothed input: ``(h / s) H`` against
    ``W diag(s) H``."""
    for _, block in adapter.moe_layers(model):
        online_hadamard_layer(block, adapter)


def online_hadamard_layer(block: nn.Module, adapter: MoEAdapter) -> None:
    """:func:`apply_online_hadamard` for one MoE block (the streaming pipeline's per-layer form)."""
    _online_hadamard_down(block, adapter)
