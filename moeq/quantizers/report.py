"""What a quantization run did, one line per quantized module (also logged)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("moeq.quantize")


@dataclass
class ModuleReport:
    """One quantized weight (stack).

    ``rel_error`` is ``||W - Q||_F / ||W||_F``; ``weighted_error`` (GPTQ-family) is ``tr((W-Q) H (W-Q)^T)``
    summed over experts with their own Hessian, i.e. the calibration output error ``||X W^T - X Q^T||^2``;
    ``tokens`` the calibration tokens behind the Hessian(s).
    """

    name: str
    shape: tuple[int, ...]
    bits: int
    group_size: int
    rel_error: float
    seconds: float
    tokens: int | None = None
    weighted_error: float | None = None


@dataclass
class QuantReport:
    modules: list[ModuleReport] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)

    def add(self, rep: ModuleReport) -> None:
        self.modules.append(rep)
        extra = "" if rep.tokens is None else f" tokens={rep.tokens}"
        if rep.weighted_error is not None:
            extra += f" weighted_err={rep.weighted_error:.4e}"
        logger.info("%s %s w%dg%d rel_err=%.4e%s %.2fs", rep.name, rep.shape, rep.bits, rep.group_size,
                    rep.rel_error, extra, rep.seconds)


def rel_error(w: torch.Tensor, q: torch.Tensor) -> float:
    """``||w - q||_F / ||w||_F`` in float32."""
    w = w.detach().float()
    return float((w - q.float().reshape(w.shape)).norm() / w.norm().clamp_min(1e-30))
