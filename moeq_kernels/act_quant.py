"""Activation quantization: THE definition of moeq's dynamic per-token symmetric activation formats.

Every path that quantizes activations (the reference backend's fake-quant, ``moeq.nn.QuantizedLinear``, the
W4A8 kernels and their bit-exact emulations) follows this module, so "W4A8" means one thing everywhere.

Formats (:data:`ACT_FORMATS`), for one token row ``x [K]`` computed in float32:

    amax  = max(max_k |x_k|, AMAX_FLOOR)
    scale = amax * clip / QMAX                (float32, one per token)
    int:      q_k = clamp(round_half_even(x_k / scale), -QMAX, QMAX)    QMAX = 2^(bits-1) - 1 (127 or 7)
    fp8_e4m3: q_k = float8_e4m3fn(clamp(x_k / scale, -448, 448))        QMAX = 448 (e4m3's largest finite)
    dequantized value: q_k * scale

``clip`` in (0, 1] shrinks the range below the token's absmax (values beyond it saturate); it is searched per
layer on calibration data (``moeq`` side) and stored with the module. Symmetric, no zero point: the kernels
then need one float per token and no correction term. ``x_k / scale`` is a true IEEE float32 division (Triton
kernels use ``tl.math.div_rn``, not the approximate ``/``), which is what makes emulations bit-exact.

INT4 codes of the weights are exact in e4m3 and in int8, so a W4A8 kernel converts them in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACT_FORMATS = ("int", "fp8_e4m3")
AMAX_FLOOR = 1e-8  # an all-zero token gets a tiny positive scale (codes 0) instead of 0/0
FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class ActSpec:
    """How one activation tensor is quantized at run time.

    Attributes:
        bits: 8 or 4 (``fp8_e4m3`` needs 8).
        format: ``int`` (symmetric integer codes) or ``fp8_e4m3``.
        clip: ratio of the per-token absmax mapped to the largest code, in (0, 1].
    """

    bits: int = 8
    format: str = "int"
    clip: float = 1.0

    def __post_init__(self):
        if self.format not in ACT_FORMATS:
            raise ValueError(f"activation format {self.format!r} not supported; choose from {ACT_FORMATS}")
        if self.bits not in (4, 8) or (self.format == "fp8_e4m3" and self.bits != 8):
            raise ValueError(f"activation bits={self.bits} not supported for format {self.format!r} "
                             "(int: 4 or 8; fp8_e4m3: 8)")
        if not 0.0 < float(self.clip) <= 1.0:
            raise ValueError(f"activation clip ratio must be in (0, 1], got {self.clip}")

    @property
    def qmax(self) -> float:
        return FP8_E4M3_MAX if self.format == "fp8_e4m3" else float(2 ** (self.bits - 1) - 1)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "format": self.format, "clip": float(self.clip)}

    @classmethod
    def from_dict(cls, d: dict) -> "ActSpec":
        return cls(int(d["bits"]), str(d.get("format", "int")), float(d.get("clip", 1.0)))

    def with_clip(self, clip: float) -> "ActSpec":
        return ActSpec(self.bits, self.format, float(clip))


def act_scales(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """Per-token scales: float32 ``[..., 1]`` for ``x [..., K]`` (any float dtype)."""
    amax = x.detach().to(torch.float32).abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    return amax * float(spec.clip) / spec.qmax


def quantize_act(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of ``x [..., K]``.

    Returns:
        codes: ``[..., K]`` int8 (``int``; INT4 codes in [-7, 7] are stored one per int8) or
        ``torch.float8_e4m3fn`` (``fp8_e4m3``); scales: float32 ``[..., 1]``.
    """
    scale = act_scales(x, spec)
    y = x.to(torch.float32) / scale
    if spec.format == "fp8_e4m3":
        return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale
    return torch.round(y).clamp(-spec.qmax, spec.qmax).to(torch.int8), scale


def dequantize_act(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scales`` (float32 product) rounded once to ``dtype``; shapes as :func:`quantize_act`."""
    return (codes.to(torch.float32) * scales).to(dtype)


def fake_quant_act(x: torch.Tensor, spec: ActSpec | None) -> torch.Tensor:
    """``x`` quantized and dequantized per token (same shape and dtype); ``spec=None`` returns ``x``."""
    if spec is None:
        return x
    codes, scales = quantize_act(x, spec)
    return dequantize_act(codes, scales, x.dtype)
