"""Input Hessians ``H = sum_t w_t x_t x_t^T`` (float32) for linears and for every expert of an experts module."""

from __future__ import annotations

import torch


class Hessian:
    """Weighted second moment of one linear layer's inputs.

    ``h [K, K]`` float32 accumulates ``sum_t w_t x_t x_t^T``; ``weight`` is ``sum_t w_t`` and ``tokens`` the
    number of tokens with ``w_t > 0``. Scale does not matter to GPTQ (damping is relative), so :meth:`mean`
    normalizes by the weight only for readability and blending.
    """

    def __init__(self, dim: int, device: torch.device | str):
        self.h = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.weight = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """Accumulate inputs ``x [T, K]`` with per-token weights ``w [T]`` (None: all 1)."""
        xf = x.reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)
        if w is None:
            self.h.addmm_(xf.T, xf)
            self.weight += xf.shape[0]
            self.tokens += xf.shape[0]
            return
        wf = w.reshape(-1).to(self.h.device, torch.float32)
        if bool((wf == 1).all()):  # unit weights (plain GPTQ, no padding): sqrt(1) * x == x, no masking
            # a fresh contiguous copy, as the masked path makes: the same matmul, the same bits
            xs = xf.clone(memory_format=torch.contiguous_format)
            self.h.addmm_(xs.T, xs)
            self.weight += float(wf.sum())
            self.tokens += wf.numel()
            return
        keep = wf > 0
        xs = xf[keep] * wf[keep].sqrt().unsqueeze(1)
        self.h.addmm_(xs.T, xs)
        self.weight += float(wf[keep].sum())
        self.tokens += int(keep.sum())

    def mean(self) -> torch.Tensor:
        return self.h / max(self.weight, 1e-12)


class ExpertHessians:
    """One :class:`Hessian` per expert of an experts module (lazily allocated: experts never hit cost nothing)."""

    def __init__(self, num_experts: int, dim: int, device: torch.device | str):
        self.num_experts, self.dim, self.device = num_experts, dim, device
        self.per_expert: dict[int, Hessian] = {}

    def add(self, e: int, x: torch.Tensor, w: torch.Tensor | None = None) -> None:
        if e not in self.per_expert:
            self.per_expert[e] = Hessian(self.dim, self.device)
        self.per_expert[e].add(x, w)

    def get(self, e: int) -> Hessian:
        return self.per_expert.get(e) or Hessian(self.dim, self.device)

    def tokens(self) -> list[int]:
        return [self.per_expert[e].tokens if e in self.per_expert else 0 for e in range(self.num_experts)]
