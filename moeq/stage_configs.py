"""Per-stage configs: the small dataclasses :class:`~moeq.config.QuantConfig` is composed of.

Each pipeline stage (``moeq.pipeline.stages``) reads only its own config. ``QuantConfig`` keeps the flat
field names as its storage because they are what every checkpoint's ``quantization_config`` holds (old
checkpoints keep loading); ``moeq.config.STAGE_FIELDS`` partitions those fields (a test checks that every field
is in exactly one stage) and the dataclasses here are built from ``QuantConfig``'s own declarations, so a
setting's type and default are written once. ``QuantConfig.stage(name)`` returns a stage's view and
``QuantConfig.compose(...)`` builds a config from stage configs. A new stage: its fields on ``QuantConfig``, its
entry in ``STAGE_FIELDS``, its flags in ``moeq/cli_flags.py`` (group = the stage name), its class in the
pipeline.
"""

from moeq.config import ACT_CLIP_GRID, STAGE_CONFIGS

WeightsConfig = STAGE_CONFIGS["weights"]
ClipConfig = STAGE_CONFIGS["clip"]
RotationConfig = STAGE_CONFIGS["rotation"]
SmoothingConfig = STAGE_CONFIGS["smoothing"]
RouterConfig = STAGE_CONFIGS["router"]
GPTQConfig = STAGE_CONFIGS["gptq"]
MixedConfig = STAGE_CONFIGS["mixed"]
ActConfig = STAGE_CONFIGS["activations"]
RuntimeConfig = STAGE_CONFIGS["runtime"]

__all__ = ["ACT_CLIP_GRID", "STAGE_CONFIGS", "ActConfig", "ClipConfig", "GPTQConfig", "MixedConfig", "RotationConfig",
           "RouterConfig", "RuntimeConfig", "SmoothingConfig", "WeightsConfig"]
