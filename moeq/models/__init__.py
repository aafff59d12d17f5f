"""Architecture adapters (see ``base.MoEAdapter``)."""

from moeq.models import families
from moeq.models.base import MoEAdapter, UnsupportedModelError, adapter_for, supported_model_types

__all__ = ["MoEAdapter", "UnsupportedModelError", "adapter_for", "families", "supported_model_types"]
