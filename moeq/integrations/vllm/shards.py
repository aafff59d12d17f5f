"""Engine-independent pieces of the vLLM plugin: scheme grouping and tensor-parallel slicing of packed tensors.

Nothing here imports vLLM, so the main test suite checks it. Packed format: ``moeq_kernels.packing``
(``qweight`` int32 ``[N, K*b/32]``, ``scales`` 16-bit ``[N, K/g]``, ``qzeros`` uint8 ``[N, K/g]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from moeq_kernels.packing import SUPPORTED_BITS

FIELDS = ("qweight", "scales", "qzeros")


class MoeqServingError(ValueError):
    """A moeq checkpoint cannot be served with the requested engine settings (the message says which)."""


def refuse_act_quant(full_config: dict) -> None:
    """The plugin serves weight-only checkpoints: an activation-quantized one (``act13`` / ``act2`` / ``act``
    per module) is refused, because its fused-MoE and linear methods call the kernels without activation specs
    and would silently serve it as W4A16."""
    for name, m in full_config.get("modules", {}).items():
        if "act13" in m or "act2" in m:
            raise MoeqServingError(f"{name}: this checkpoint quantizes activations (act bits "
                                   f"{(m.get('act13') or m.get('act2'))['bits']}); the vLLM plugin serves weight-only "
                                   "moeq checkpoints: evaluate it with `moeq eval`, or re-quantize without --act-bits")
    for name, m in full_config.get("linear_modules", {}).items():
        if "act" in m:
            raise MoeqServingError(f"{name}: quantized linear with activation quantization; the vLLM plugin serves "
                                   "weight-only moeq checkpoints (re-quantize without --act-bits)")


@dataclass(frozen=True)
class Scheme:
    """One packed-weight scheme: bits, resolved group size (never -1 here: the checkpoint stores it resolved
    to K, and the loader resolves -1 the same way), symmetry, scale dtype."""

    bits: int
    group_size: int
    sym: bool
    scale_dtype: torch.dtype

    @classmethod
    def from_spec(cls, spec: dict, k: int, scale_dtype: torch.dtype) -> "Scheme":
        if spec["bits"] not in SUPPORTED_BITS:
            raise MoeqServingError(f"bits={spec['bits']} not in {SUPPORTED_BITS}")
        g = k if spec.get("group_size", 128) == -1 else int(spec.get("group_size", 128))
        return cls(int(spec["bits"]), g, bool(spec.get("sym", True)), scale_dtype)

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, int]]:
        """Shapes of one ``[N, K]`` weight's packed tensors (``qzeros`` only when asymmetric)."""
        out = {"qweight": (n, k * self.bits // 32), "scales": (n, k // self.group_size)}
        if not self.sym:
            out["qzeros"] = (n, k // self.group_size)
        return out

    def dtype(self, field: str) -> torch.dtype:
        return {"qweight": torch.int32, "scales": self.scale_dtype, "qzeros": torch.uint8}[field]


def check_k_split(name: str, k_full: int, k_part: int, scheme: Scheme, what: str) -> None:
    """Raise :class:`MoeqServingError` unless a per-rank slice of ``k_part`` of the ``k_full`` input features
    starts and ends on group and 32-bit word boundaries (so every rank dequantizes exactly its own slice)."""
    if k_part == k_full:
        return
    if k_part % scheme.group_size or (k_part * scheme.bits) % 32:
        raise MoeqServingError(
            f"{name}: {what} splits its {k_full} input features into {k_part} per rank, which is not a multiple of "
            f"the quantization group size {scheme.group_size} (and of {32 // _gcd(scheme.bits, 32)} for "
            f"{scheme.bits}-bit packing); use a tensor-parallel degree that keeps {k_full} / degree a multiple "
            f"of {scheme.group_size}, or expert parallelism (--enable-expert-parallel)"
        )


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def narrow_k(t: torch.Tensor, field: str, scheme: Scheme, k_part: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s input-feature slice ``[rank*k_part, (rank+1)*k_part)`` of one packed ``[N, ...]`` tensor
    (``qweight`` in 32-bit words, ``scales``/``qzeros`` in groups; boundaries checked by :func:`check_k_split`)."""
    per = k_part * scheme.bits // 32 if field == "qweight" else k_part // scheme.group_size
    return t.narrow(1, rank * per, per)


def narrow_n(t: torch.Tensor, n_part: int, rank: int) -> torch.Tensor:
    """Rows ``[rank*n_part, (rank+1)*n_part)`` of a packed ``[N, ...]`` tensor (output features are unpacked)."""
    return t.narrow(0, rank * n_part, n_part)


def expert_schemes(spec: dict) -> list[tuple[Scheme, Scheme]]:
    """(gate_up scheme, down scheme) of every expert of one ``quantization_config["modules"]`` entry."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(spec.get("scale_dtype", "bfloat16"))
    if dtype is None:
        raise MoeqServingError(f"scale_dtype {spec.get('scale_dtype')!r} is not float16 or bfloat16")
    h, i = int(spec["hidden_dim"]), int(spec["intermediate_dim"])
    pairs = spec.get("expert_specs") or [[spec["gate_up"], spec["down"]]] * int(spec["num_experts"])
    if len(pairs) != int(spec["num_experts"]):
        raise MoeqServingError(f"expert_specs lists {len(pairs)} experts, num_experts is {spec['num_experts']}")
    return [(Scheme.from_spec(a, h, dtype), Scheme.from_spec(b, i, dtype)) for a, b in pairs]


def group_experts(schemes: list[tuple[Scheme, Scheme]], local_to_global: list[int]) -> list[tuple[tuple[Scheme, Scheme], list[int]]]:
    """Local experts grouped by scheme pair, in first-seen order: ``[(pair, [local ids])]`` (the groups
    ``MixedQuantizedExperts`` forms, restricted to the experts this rank holds)."""
    groups: dict[str, tuple[tuple[Scheme, Scheme], list[int]]] = {}
    for local, glob in enumerate(local_to_global):
        pair = schemes[glob]
        key = json.dumps([[p.bits, p.group_size, p.sym] for p in pair])
        groups.setdefault(key, (pair, []))[1].append(local)
    return list(groups.values())


def route_to_group(ids: torch.Tensor, group_of: torch.Tensor, local_of: torch.Tensor, g: int) -> torch.Tensor:
    """Slot indices for scheme group ``g``: ``local_of[e]`` where expert ``e = ids`` is in group ``g``, else the
    sentinel -1 every moeq backend skips. ``ids`` int ``[T, k]`` (local expert ids, -1 = not on this rank);
    ``group_of``/``local_of`` int ``[E_local]``. No host synchronisation (CUDA-graph safe)."""
    valid = ids >= 0
    safe = ids.clamp(min=0).long()
    return torch.where(valid & (group_of[safe] == g), local_of[safe], torch.full_like(local_of[safe], -1))
