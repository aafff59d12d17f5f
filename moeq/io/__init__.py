"""Checkpoint I/O: ``save_quantized`` / ``load_quantized`` and checkpoint facts for ``moeq info``."""

from moeq.io.checkpoint import CheckpointError, read_quantization_config, save_quantized
from moeq.io.load import load_quantized

__all__ = ["CheckpointError", "load_quantized", "read_quantization_config", "save_quantized"]
