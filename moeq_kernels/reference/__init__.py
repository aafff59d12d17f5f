"""Pure-PyTorch references of every moeq op: the tests' oracle and the CPU path."""

from moeq_kernels.reference.experts import fused_experts_ref
from moeq_kernels.reference.hadamard import hadamard_ref

__all__ = ["fused_experts_ref", "hadamard_ref"]
