"""``QuantizedExperts``: drop-in replacement of a transformers v5 experts module, holding packed weights."""

from __future__ import annotations

import torch
from torch import nn

from moeq.config import WeightSpec
from moeq_kernels import backends, ops
from moeq_kernels.act_quant import ActSpec
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.packing import SCALE_DTYPES, PackedWeight, check_pack_dims
from moeq_kernels.reference import fused_experts_ref

PROJ_NAMES = ("gate_up", "down")


class QuantizedExperts(nn.Module):
    """Routed experts with packed low-bit weights (format: ``moeq_kernels.packing``).

    Same forward signature as transformers v5 experts modules:
    ``forward(hidden_states [T, H], top_k_index [T, k] int, top_k_weights [T, k]) -> [T, H]``
    (``hidden_states.dtype``). Computes ``sum_j w[t, j] * down_e(silu(gate_e(x)) * up_e(x))`` through
    ``torch.ops.moeq.fused_experts`` (given :meth:`weights`, an ``ExpertWeights``), whose backend is chosen per
    call (``moeq_kernels.backends``: the measured dispatch table on a GPU) unless ``backend`` names one.

    Buffers (persistent, so ``state_dict`` / ``.to(device)`` carry them):
        ``w13_qweight`` int32 ``[E, 2I, H*b/32]``, ``w13_scales`` ``[E, 2I, H/g]``, ``w13_qzeros`` uint8 or absent
        (gate rows ``[0, I)``, up rows ``[I, 2I)``, as in transformers' ``gate_up_proj``);
        ``w2_qweight`` int32 ``[E, H, I*b/32]``, ``w2_scales`` ``[E, H, I/g]``, ``w2_qzeros``.
    ``online_hadamard``: the down input is multiplied by the orthonormal Hadamard ``H_I`` at run time (the
    offline ``W_down H_I`` is in the packed weights).
    ``act13`` / ``act2``: dynamic per-token activation quantization of the gate_up input / the down input (after
    the online Hadamard), ``moeq_kernels.act_quant.ActSpec`` or None (16-bit); passed in :meth:`weights`, so
    every backend computes what a W4A8 / W4A4 kernel would (the fast backends refuse what they cannot run).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        w13_spec: WeightSpec,
        w2_spec: WeightSpec,
        scale_dtype: torch.dtype = torch.bfloat16,
        activation: str = "silu",
        online_hadamard: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        act13: ActSpec | None = None,
        act2: ActSpec | None = None,
    ):
        super().__init__()
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.w13_spec, self.w2_spec = w13_spec, w2_spec
        self.scale_dtype, self.activation = scale_dtype, activation
        self.online_hadamard, self.backend = online_hadamard, backend
        self.act13, self.act2 = act13, act2
        self._dense_cache: dict | None = None  # dequantized experts while in moeq.nn.dense_cache.dense_weights
        self._alloc("w13", num_experts, 2 * intermediate_dim, hidden_dim, w13_spec, device)
        self._alloc("w2", num_experts, hidden_dim, intermediate_dim, w2_spec, device)

    def _alloc(self, prefix: str, e: int, n: int, k: int, spec: WeightSpec, device) -> None:
        ngroups = check_pack_dims(k, spec.bits, spec.group_size)
        self.register_buffer(f"{prefix}_qweight", torch.empty(e, n, k * spec.bits // 32, dtype=torch.int32, device=device))
        self.register_buffer(f"{prefix}_scales", torch.empty(e, n, ngroups, dtype=self.scale_dtype, device=device))
        zeros = None if spec.sym else torch.empty(e, n, ngroups, dtype=torch.uint8, device=device)
        self.register_buffer(f"{prefix}_qzeros", zeros)

    def group_size(self, prefix: str) -> int:
        """Effective group size of ``w13`` or ``w2`` (per-channel resolves to K)."""
        spec, k = (self.w13_spec, self.hidden_dim) if prefix == "w13" else (self.w2_spec, self.intermediate_dim)
        return k if spec.group_size == -1 else spec.group_size

    @classmethod
    def from_packed(
        cls, w13: PackedWeight, w2: PackedWeight, activation: str = "silu", online_hadamard: bool = False,
        backend: str = "auto",
    ) -> "QuantizedExperts":
        """Wrap packed ``gate_up`` (logical ``[E, 2I, H]``) and ``down`` (``[E, H, I]``) stacks."""
        return cls.from_weights(ExpertWeights(w13, w2, activation, online_hadamard), backend)

    @classmethod
    def from_weights(cls, weights: ExpertWeights, backend: str = "auto") -> "QuantizedExperts":
        """Wrap an :class:`ExpertWeights` (its tensors become this module's buffers, no copy)."""
        weights.validate()
        w13, w2 = weights.w13, weights.w2
        if w13.scales.dtype != w2.scales.dtype:
            raise ValueError("gate_up and down scales must share one dtype")
        e, two_i, h = w13.shape
        specs = [WeightSpec(p.bits, p.group_size, p.qzeros is None) for p in (w13, w2)]
        mod = cls(e, h, two_i // 2, specs[0], specs[1], w13.scales.dtype, weights.activation, weights.online_hadamard,
                  backend, device="meta", act13=weights.act13, act2=weights.act2)
        for prefix, p in (("w13", w13), ("w2", w2)):
            setattr(mod, f"{prefix}_qweight", p.qweight)
            setattr(mod, f"{prefix}_scales", p.scales)
            setattr(mod, f"{prefix}_qzeros", p.qzeros)
        return mod

    def packed(self, prefix: str) -> PackedWeight:
        """The ``w13`` or ``w2`` stack as a :class:`PackedWeight` (views, no copy)."""
        spec = self.w13_spec if prefix == "w13" else self.w2_spec
        return PackedWeight(
            getattr(self, f"{prefix}_qweight"), getattr(self, f"{prefix}_scales"), getattr(self, f"{prefix}_qzeros"),
            spec.bits, self.group_size(prefix),
        )

    def weights(self) -> ExpertWeights:
        """The buffers as one :class:`ExpertWeights` (views, no copy; group sizes resolved to K when per-channel)."""
        return ExpertWeights(self.packed("w13"), self.packed("w2"), self.activation, self.online_hadamard,
                             self.act13, self.act2)

    def set_act_specs(self, act13: ActSpec | None, act2: ActSpec | None) -> None:
        """Activation specs of the gate_up input and the down input (None = 16-bit)."""
        self.act13, self.act2 = act13, act2

    def locate(self, e: int) -> tuple["QuantizedExperts", int]:
        """The module holding expert ``e`` and its index there (itself; see ``MixedQuantizedExperts``)."""
        return self, e

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(f"hidden_states must be [T, {self.hidden_dim}], got {tuple(hidden_states.shape)}")
        if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"top_k_index {tuple(top_k_index.shape)} / top_k_weights {tuple(top_k_weights.shape)} must both be "
                f"[T={hidden_states.shape[0]}, k]"
            )
        weights = self.weights()
        if self._dense_cache is not None:
            attrs = weights.dispatch_attrs(hidden_states, top_k_index, explicit=self.backend != "auto")
            if backends.backend_for("fused_experts", hidden_states.device, self.backend, **attrs) == "reference":
                return fused_experts_ref(hidden_states, top_k_index, top_k_weights, weights, self._dense_cache)
        return ops.apply_experts(hidden_states, top_k_index, top_k_weights, weights, self.backend)

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` in ``dtype`` (for fake-quant checks)."""
        return self.packed("w13").dequantize(dtype), self.packed("w2").dequantize(dtype)

    def nbytes(self) -> int:
        """Bytes of the packed tensors (weights + scales + zeros)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):
        # ``model.float()`` / ``model.to(torch.float32)`` would cast the scales too; the format keeps them 16-bit.
        super()._apply(fn, recurse)
        if self._dense_cache is not None:  # moved or cast: the cached copies are of the old tensors
            self._dense_cache = {}
        for prefix in ("w13", "w2"):
            s = getattr(self, f"{prefix}_scales")
            if s is not None and s.dtype != self.scale_dtype and s.dtype.is_floating_point:
                if s.dtype in SCALE_DTYPES:
                    self.scale_dtype = s.dtype  # an explicit cast to the other 16-bit dtype is honoured
                else:
                    setattr(self, f"{prefix}_scales", s.to(self.scale_dtype))
        return self

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"gate_up={self.w13_spec}, down={self.w2_spec}, scales={self.scale_dtype}, "
            f"online_hadamard={self.online_hadamard}, backend={self.backend}"
            + (f", act13={self.act13}, act2={self.act2}" if self.act13 or self.act2 else "")
        )
