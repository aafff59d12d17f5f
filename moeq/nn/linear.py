"""``QuantizedLinear``: drop-in for a bias-free or biased ``nn.Linear`` with packed low-bit weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeq.config import WeightSpec
from moeq_kernels import ops
from moeq_kernels.act_quant import ActSpec, fake_quant_act
from moeq_kernels.packing import SCALE_DTYPES, PackedWeight, check_pack_dims


class QuantizedLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` for ``x [..., K]`` -> ``[..., N]`` (``x.dtype``).

    Buffers: ``qweight`` int32 ``[N, K*b/32]``, ``scales`` ``[N, K/g]``, ``qzeros`` uint8 ``[N, K/g]`` or absent,
    ``bias`` ``[N]`` or absent (format: ``moeq_kernels.packing``, one matrix = a stack of E = 1). The weight is dequantized per call through ``torch.ops.moeq.dequantize`` (a decode-speed W4A16
    GEMV for attention/shared experts is future kernel work; today this saves memory, not time).
    ``act``: when set (``moeq_kernels.act_quant.ActSpec``), the input is fake-quantized per token (each row of
    ``x [..., K]`` its own scale) before the product, as a W4A8 / W4A4 GEMM would read it.
    """

    def __init__(self, in_features: int, out_features: int, spec: WeightSpec, scale_dtype: torch.dtype = torch.bfloat16,
                 bias: bool = False, backend: str = "auto", device=None, act: ActSpec | None = None):
        super().__init__()
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be float16 or bfloat16, got {scale_dtype}")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.scale_dtype, self.backend, self.act = scale_dtype, backend, act
        self._dense_cache: dict | None = None  # the dequantized weight while in moeq.nn.dense_cache.dense_weights
        g = check_pack_dims(in_features, spec.bits, spec.group_size)
        self.register_buffer("qweight", torch.empty(out_features, in_features * spec.bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(out_features, g, dtype=scale_dtype, device=device))
        self.register_buffer("qzeros", None if spec.sym else torch.empty(out_features, g, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @property
    def group_size(self) -> int:
        return self.in_features if self.spec.group_size == -1 else self.spec.group_size

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None, backend: str = "auto") -> "QuantizedLinear":
        packed.validate()
        e, n, k = packed.shape
        if e != 1:
            raise ValueError(f"a linear layer holds one weight, got a stack of {e}")
        spec = WeightSpec(packed.bits, packed.group_size, packed.qzeros is None)
        mod = cls(k, n, spec, packed.scales.dtype, bias is not None, backend, device="meta")
        mod.qweight, mod.scales = packed.qweight[0], packed.scales[0]
        mod.qzeros = None if packed.qzeros is None else packed.qzeros[0]
        mod.bias = None if bias is None else bias.detach().clone()
        return mod

    def packed(self) -> PackedWeight:
        """The weight as a one-matrix stack (``[1, N, ...]`` views)."""
        z = None if self.qzeros is None else self.qzeros[None]
        return PackedWeight(self.qweight[None], self.scales[None], z, self.spec.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self._dense_cache is None else self._dense_cache.get((x.dtype, x.device))
        if w is None:
            p = self.packed()
            if self._dense_cache is None:
                w = ops.dequantize(p.qweight, p.scales, p.qzeros, p.bits, p.group_size, self.backend)[0].to(x.dtype)
            else:  # allocated before the temporaries, so the kept copy does not sit between freed ones
                w = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=x.device)
                w.copy_(ops.dequantize(p.qweight, p.scales, p.qzeros, p.bits, p.group_size, self.backend)[0])
                self._dense_cache[(x.dtype, x.device)] = w
        return F.linear(fake_quant_act(x, self.act), w, None if self.bias is None else self.bias.to(x.dtype))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):
        # keep scales 16-bit through model.float() (see QuantizedExperts._apply)
        super()._apply(fn, recurse)
        if self._dense_cache is not None:  # moved or cast: the cached copies are of the old tensors
            self._dense_cache = {}
        if self.scales.dtype in SCALE_DTYPES:
            self.scale_dtype = self.scales.dtype
        elif self.scales.is_floating_point():
            self.scales = self.scales.to(self.scale_dtype)
        return self

    def extra_repr(self) -> str:
        act = f", act={self.act}" if self.act is not None else ""
        return f"in={self.in_features}, out={self.out_features}, {self.spec}, bias={self.bias is not None}{act}"
