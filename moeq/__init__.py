"""moeq: MoE-aware low-bit quantization with packed INT4 expert kernels.

Public API: :class:`QuantConfig`, :func:`quantize_model`, :func:`save_quantized`, :func:`load_quantized`.
"""

__version__ = "0.1.0"

from moeq.assets import demo_model_path  # noqa: E402
from moeq.config import QuantConfig, WeightSpec  # noqa: E402
from moeq.io import CheckpointError, load_quantized, save_quantized  # noqa: E402
from moeq.models import UnsupportedModelError, adapter_for, supported_model_types  # noqa: E402
from moeq.nn import QuantizedExperts  # noqa: E402
from moeq.quantize import quantize_model  # noqa: E402

__all__ = [
    "CheckpointError", "QuantConfig", "QuantizedExperts", "UnsupportedModelError", "WeightSpec", "adapter_for", "demo_model_path",
    "load_quantized", "quantize_model", "save_quantized", "supported_model_types",
]
