"""Drop-in quantized modules."""

from moeq.nn.experts import QuantizedExperts

__all__ = ["QuantizedExperts"]
