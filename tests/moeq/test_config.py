"""QuantConfig / WeightSpec validation, overrides and serialization."""

import pytest
import torch

from moeq.config import QuantConfig, WeightSpec


def test_roundtrip_through_dict():
    c = QuantConfig(bits=3, group_size=64, sym=False, overrides={"m.experts.down": {"bits": 8}})
    assert QuantConfig.from_dict({**c.to_dict(), "quant_method": "moeq", "modules": {}}) == c


def test_override_targets_module_then_projection():
    c = QuantConfig(bits=4, overrides={"a.experts": {"bits": 8}, "a.experts.down": {"group_size": 32}})
    assert c.spec_for("a.experts", "gate_up") == WeightSpec(8, 128, True)
    assert c.spec_for("a.experts", "down") == WeightSpec(8, 32, True)
    assert c.spec_for("b.experts", "down") == WeightSpec(4, 128, True)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, "bits=5"),
    ({"group_size": 0}, "group_size"),
    ({"scale_dtype": "float32"}, "scale_dtype"),
    ({"overrides": {"x": {"bitz": 4}}}, "unknown keys"),
    ({"overrides": {"x": {"bits": 7}}}, "bits=7"),
    ({"clip_max_shrink": 1.5}, "clip_max_shrink"),
])
def test_bad_configs_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_scale_dtype_auto_follows_16bit_models():
    c = QuantConfig()
    assert c.resolve_scale_dtype(torch.float16) == torch.float16
    assert c.resolve_scale_dtype(torch.float32) == torch.bfloat16
    assert QuantConfig(scale_dtype="float16").resolve_scale_dtype(torch.bfloat16) == torch.float16
