"""vLLM ``LinearMethodBase`` for the plain linears moeq quantized (attention, shared experts, dense MLPs).

One vLLM layer may fuse several checkpoint linears (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up); they
must share one scheme. Parameters on the layer, ``Np`` = this rank's output features (sum of
``output_partition_sizes``), ``Kp`` = its input features::

    qweight int32 [Np, Kp*b/32]    scales 16-bit [Np, Kp/g]    qzeros uint8 [Np, Kp/g] (asymmetric only)

Column-parallel layers take a row slice of each shard, row-parallel ones a slice of K on group and word
boundaries. ``apply`` dequantizes through ``torch.ops.moeq.dequantize`` and runs one GEMM (as moeq's own
``QuantizedLinear`` does: memory saved, not time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearMethodBase, RowParallelLinear

from moeq.integrations.vllm.shards import MoeqServingError, Scheme, check_k_split, narrow_k, narrow_n

_QKV = {"q": 0, "k": 1, "v": 2}


class MoeqLinearMethod(LinearMethodBase):
    """Packed weight of the checkpoint linears ``names`` (in shard order), all with scheme ``scheme``."""

    def __init__(self, prefix: str, names: list[str], specs: list[dict], backend: str = "auto"):
        self.prefix, self.names, self.backend = prefix, names, backend
        dtypes = {s.get("scale_dtype", "bfloat16") for s in specs}
        keys = {(s["bits"], s["group_size"], s.get("sym", True)) for s in specs}
        if len(keys) != 1 or len(dtypes) != 1:
            raise MoeqServingError(
                f"{prefix}: vLLM fuses {names} into one layer, but the checkpoint quantized them with different "
                f"schemes {sorted(map(str, keys))} / scale dtypes {sorted(dtypes)}; one scheme per fused layer is required")
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtypes.pop()]
        self.specs = specs
        self.in_features = int(specs[0]["in_features"])
        self.scheme = Scheme.from_spec(specs[0], self.in_features, dtype)
        self.has_bias = [bool(s.get("bias", False)) for s in specs]

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        if input_size != self.in_features:
            raise MoeqServingError(f"{self.prefix}: vLLM layer has {input_size} inputs, checkpoint {self.in_features}")
        if len(output_partition_sizes) != len(self.names):
            raise MoeqServingError(f"{self.prefix}: vLLM layer has {len(output_partition_sizes)} output shards, "
                                   f"the checkpoint names {self.names}")
        check_k_split(self.prefix, input_size, input_size_per_partition, self.scheme,
                      f"tensor parallelism (TP={getattr(layer, 'tp_size', 1)})")
        self.kp, self.parts = input_size_per_partition, list(output_partition_sizes)
        self.offsets = [sum(self.parts[:i]) for i in range(len(self.parts))]
        self.row_parallel = isinstance(layer, RowParallelLinear)
        layer.moeq_loaded = set()
        for field, shape in self.scheme.shapes(sum(self.parts), self.kp).items():
            p = torch.nn.Parameter(torch.zeros(shape, dtype=self.scheme.dtype(field)), requires_grad=False)
            p.weight_loader = self._make_loader(layer, field)
            layer.register_parameter(field, p)

    def _make_loader(self, layer, field: str):
        def loader(param, loaded_weight, loaded_shard_id=None):
            self._load(layer, param, field, loaded_weight, loaded_shard_id)

        return loader

    def _shard_index(self, shard_id) -> int:
        if shard_id is None:
            return 0
        if isinstance(shard_id, str):
            return _QKV[shard_id]
        if isinstance(shard_id, tuple):
            raise MoeqServingError(f"{self.prefix}: fused multi-shard checkpoint tensors are not moeq's layout")
        return int(shard_id)

    def _load(self, layer, param, field: str, w: torch.Tensor, shard_id) -> None:
        idx = self._shard_index(shard_id)
        tp_rank = getattr(layer, "tp_rank", 0)
        name = self.names[idx]
        if self.row_parallel:
            src = narrow_k(w, field, self.scheme, self.kp, tp_rank) if self.kp != self.in_features else w
        else:
            rank = tp_rank // getattr(layer, "num_kv_head_replicas", 1) if shard_id in ("k", "v") else tp_rank
            src = narrow_n(w, self.parts[idx], rank) if w.shape[0] != self.parts[idx] else w
        view = param.data.narrow(0, self.offsets[idx], self.parts[idx])
        if tuple(src.shape) != tuple(view.shape) or src.dtype != view.dtype:
            raise MoeqServingError(f"{name}.{field}: stored {w.dtype} {tuple(w.shape)}, this rank expects "
                                   f"{view.dtype} {tuple(view.shape)}")
        view.copy_(src)
        layer.moeq_loaded.add((idx, field))

    def process_weights_after_loading(self, layer) -> None:
        want = {(i, f) for i in range(len(self.names)) for f in self.scheme.shapes(1, self.kp)}
        missing = sorted(want - layer.moeq_loaded)
        if missing:
            raise MoeqServingError(f"{self.prefix}: packed tensors missing from the checkpoint: "
                                   f"{[f'{self.names[i]}.{f}' for i, f in missing]}")

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., Kp]`` -> ``[..., Np]`` in ``x.dtype`` (bias added by the caller's convention: here)."""
        z = None if self.scheme.sym else layer.qzeros[None]
        w = torch.ops.moeq.dequantize(layer.qweight[None], layer.scales[None], z, self.scheme.bits,
                                      self.scheme.group_size, self.backend)[0]
        return F.linear(x, w.to(x.dtype), bias)
