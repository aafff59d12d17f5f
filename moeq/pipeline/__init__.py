"""The streaming layer-wise pipeline: quantize a checkpoint on disk one decoder layer at a time."""

from moeq.pipeline.stages import LayerContext, Stage, stages_for
from moeq.pipeline.stream import quantize_checkpoint

__all__ = ["LayerContext", "Stage", "quantize_checkpoint", "stages_for"]
