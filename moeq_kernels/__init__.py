"""moeq_kernels: the packed low-bit format and the ops that consume it. Knows tensors, not models."""

from moeq_kernels import hadamard, ops
from moeq_kernels.backends import backend_for, describe
from moeq_kernels.experts import ExpertWeights
from moeq_kernels.packing import PackedWeight, dequantize, pack, unpack

__all__ = ["ExpertWeights", "PackedWeight", "hadamard", "backend_for", "dequantize", "describe", "ops", "pack", "unpack"]
