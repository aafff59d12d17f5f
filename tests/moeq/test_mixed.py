"""Mixed precision: scores, allocation under a bit budget, and a plan honoured end to end (grouped experts,
fake-quant equality, save/load, export refusal)."""

import copy
import json

import pytest
import torch

import moeq
from moeq.demo import _fake_quant_reference
from moeq.io.export import ExportError, export_checkpoint
from moeq.mixed import allocate_bits, average_bits, outlier_scores, plan_mixed_precision, routing_scores
from moeq.models import adapter_for
from moeq.nn.mixed import MixedQuantizedExperts
from moeq.testing import tiny_model

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def test_allocation_spends_the_budget_on_the_highest_scores():
    units = [("a", 100, 0.1), ("b", 100, 0.9), ("c", 200, 0.5), ("d", 100, 0.3)]
    plan = allocate_bits(units, budget=3.0, low=2, high=4)  # half of 500 weights may take 4 bits
    # greedy by score: b fits (100 <= 250), c would overflow (300), d fits (200), a would overflow
    assert plan == {"b": 4, "c": 2, "d": 4, "a": 2}
    avg = sum(plan[k] * n for k, n, _ in units) / 500
    assert avg <= 3.0
    assert plan["b"] == 4  # the most important unit always gets the high width


def test_budget_outside_levels_refused():
    with pytest.raises(ValueError, match="outside"):
        allocate_bits([("a", 1, 1.0)], budget=5.0, low=2, high=4)


def test_outlier_score_finds_planted_column():
    model = tiny_model("olmoe")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[5, :, 7] *= 50
    s = outlier_scores(model, adapter_for(model))["model.layers.0.mlp.experts"]["gate_up"]
    assert int(s.argmax()) == 5


def test_routing_scores_count_every_slot():
    model = tiny_model("mixtral")
    s = routing_scores(model, adapter_for(model), CALIB)["model.layers.0.mlp.experts"]
    assert float(s["frequency"].sum()) == CALIB.numel() * model.config.num_experts_per_tok
    assert float(s["affinity"].sum()) == pytest.approx(CALIB.numel(), rel=1e-5)  # renormalized top-k weights
    assert 0 < float(s["block"]) < 2


@pytest.mark.parametrize("granularity", ["layer", "expert", "linear"])
def test_plan_meets_budget(granularity):
    model = tiny_model("qwen3_moe")
    ad = adapter_for(model)
    plan = plan_mixed_precision(model, ad, 3.0, "affinity", granularity, (2, 4), CALIB)
    avg = average_bits(model, ad, plan)
    assert 2.5 <= avg <= 3.0  # within one unit (here at most half the weights) below the budget


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mixed_plan_is_honoured_end_to_end(tmp_path, method):
    fp = tiny_model("qwen2_moe")
    ad = adapter_for(fp)
    plan = plan_mixed_precision(fp, ad, 3.0, "frequency", "expert", (2, 4), CALIB)
    model = copy.deepcopy(fp)
    moeq.quantize_model(model, moeq.QuantConfig(method=method, group_size=32, expert_bits=plan), calib=CALIB)
    ex = model.model.layers[0].mlp.experts
    assert isinstance(ex, MixedQuantizedExperts)
    got_bits = [a.bits for a, _ in ex.expert_specs()]
    assert got_bits == plan["model.layers.0.mlp.experts"]["gate_up"]
    ref = _fake_quant_reference(fp, model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    moeq.save_quantized(model, tmp_path / "q")
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["expert_bits"] == plan and len(q["modules"]["model.layers.0.mlp.experts"]["expert_specs"]) == 8
    loaded = moeq.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    with pytest.raises(ExportError, match="mixed bit widths"):
        export_checkpoint(tmp_path / "q", tmp_path / "ct", "compressed-tensors")


def test_outlier_score_needs_no_calibration():
    model = tiny_model("olmoe")
    plan = plan_mixed_precision(model, adapter_for(model), 3.5, "outlier", "linear")
    assert set(plan["model.layers.0.mlp.experts"]["down"]) <= {3, 4}
    with pytest.raises(ValueError, match="needs calibration"):
        plan_mixed_precision(model, adapter_for(model), 3.5, "affinity")
