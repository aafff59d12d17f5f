"""Activation quantization in the pipeline: config and CLI, per-module specs through save / load / info / export /
the vLLM config check, QuantizedLinear's per-token fake-quant against a float64 reference, the clip search's
choice on constructed examples, and act-quantized Hessians."""

import copy
import json

import pytest
import torch

import moeq
from moeq.act_calib import search_clip, search_experts_clips, search_linear_clip
from moeq.calib.capture import CalibExperts
from moeq.cli import build_parser
from moeq.cli_flags import quant_config as _quant_config
from moeq.cli_checks import check_quantize_args
from moeq.io.checkpoint import CheckpointError
from moeq.io.export import ExportError, export_checkpoint
from moeq.io.info import checkpoint_info
from moeq.integrations.vllm.shards import MoeqServingError, refuse_act_quant
from moeq.nn.linear import QuantizedLinear
from moeq.quantizers.rtn import rtn_quantize
from moeq.testing import tiny_model
from moeq_kernels.act_quant import ActSpec

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))


# ---- config and CLI ------------------------------------------------------------------------------------------
def test_config_round_trip_and_spec():
    cfg = moeq.QuantConfig(act_bits=8, act_format="fp8_e4m3", quantize_linears=["attention"], act_linears=["attention"],
                           act_clip=0.9, act_clip_search=True, act_clip_grid=[1.0, 0.8], act_hessian="quantized")
    back = moeq.QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert cfg.act_spec() == ActSpec(8, "fp8_e4m3", 0.9) and cfg.act_spec(0.7).clip == 0.7
    assert moeq.QuantConfig().act_spec() is None
    # a config written before activation quantization existed loads as 16-bit activations
    old = {k: v for k, v in moeq.QuantConfig().to_dict().items() if not k.startswith("act_")}
    assert moeq.QuantConfig.from_dict(old).act_bits is None


@pytest.mark.parametrize("kwargs,match", [
    ({"act_bits": 4, "act_format": "fp8_e4m3"}, "fp8_e4m3"),
    ({"act_bits": 6}, "activation bits=6"),
    ({"act_bits": 8, "act_format": "nf4"}, "act_format"),
    ({"act_bits": 8, "act_linears": ["attention"]}, "not in quantize_linears"),
    ({"act_bits": 8, "act_clip": 0.0}, "clip"),
    ({"act_bits": 8, "act_clip_grid": [1.2]}, "act_clip_grid"),
    ({"act_clip_search": True}, "need act_bits"),
    ({"act_bits": 8, "act_hessian": "int"}, "act_hessian"),
])
def test_bad_act_configs_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moeq.QuantConfig(**kwargs)


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--act-bits", "8", "--act-format",
                                      "fp8_e4m3", "--quantize-linears", "attention", "--act-linears", "attention",
                                      "--act-clip", "0.9", "--act-clip-search", "--act-hessian", "quantized"])
    check_quantize_args(args)
    cfg = _quant_config(args)
    assert (cfg.act_bits, cfg.act_format, cfg.act_linears, cfg.act_clip, cfg.act_clip_search, cfg.act_hessian) == \
        (8, "fp8_e4m3", ["attention"], 0.9, True, "quantized")


@pytest.mark.parametrize("argv,match", [
    (["--act-bits", "4", "--act-format", "fp8_e4m3"], "8-bit format"),
    (["--act-clip-search"], "needs --act-bits"),
    (["--act-bits", "8", "--act-linears", "attention"], "add them to --quantize-linears"),
    (["--act-bits", "8", "--act-clip", "1.5"], "--act-clip must be in"),
])
def test_cli_act_mistakes_are_caught_before_loading(argv, match):
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", *argv])
    with pytest.raises(ValueError, match=match):
        check_quantize_args(args)


# ---- modules ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [ActSpec(8, "int", 1.0), ActSpec(4, "int", 0.8), ActSpec(8, "fp8_e4m3", 0.9)])
def test_quantized_linear_fake_quantizes_its_input_per_token(spec):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=gen)
    x = torch.randn(3, 5, 64, generator=gen, dtype=torch.float64).float()
    x[0, 0, 7] = 40.0  # an outlier in one token: only that token's scale grows
    lin = QuantizedLinear.from_packed(rtn_quantize(w, moeq.WeightSpec(4, 32), torch.float16), backend="reference")
    dense = lin(torch.eye(64)).T.double()  # the weight the layer multiplies with (16-bit dequantized)
    # float64 reference of the per-token symmetric format (moeq_kernels.act_quant's docstring)
    xd = x.double().reshape(-1, 64)
    scale = xd.abs().amax(-1, keepdim=True) * spec.clip / spec.qmax
    if spec.format == "int":
        xq = torch.round(xd / scale).clamp(-spec.qmax, spec.qmax) * scale
    else:
        xq = (xd / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * scale
    want = (xq @ dense.T).reshape(3, 5, 24)
    assert torch.equal(lin(x), QuantizedLinear.from_packed(lin.packed(), backend="reference")(x))  # act None: plain
    lin.act = spec
    got = lin(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(got, x @ dense.float().T, atol=1e-3)  # the fake-quant did something


# ---- checkpoint, info, export, vLLM -----------------------------------------------------------------------------
def _act_model(**kw):
    model = tiny_model("qwen2_moe")
    cfg = moeq.QuantConfig(**{"group_size": 32, "act_bits": 4, "quantize_linears": ["attention", "shared_experts"],
                              "act_linears": ["attention"], "act_clip_search": True, **kw})
    rep = moeq.quantize_model(model, cfg, calib=CALIB)
    return model, rep


def test_checkpoint_round_trip_with_act_specs(tmp_path):
    model, rep = _act_model()
    q = model.config.quantization_config
    mods = rep.calibration["activations"]["modules"]
    entry = q["modules"]["model.layers.0.mlp.experts"]
    assert entry["act13"] == {"bits": 4, "format": "int", "clip": mods["model.layers.0.mlp.experts"]["act13_clip"]}
    assert entry["act2"]["clip"] == mods["model.layers.0.mlp.experts"]["act2_clip"]
    attn = [n for n in q["linear_modules"] if ".self_attn." in n]
    shared = [n for n in q["linear_modules"] if ".shared_expert." in n]
    assert attn and all("act" in q["linear_modules"][n] for n in attn)
    assert shared and not any("act" in q["linear_modules"][n] for n in shared)  # not in act_linears
    moeq.save_quantized(model, tmp_path / "ck")
    loaded = moeq.load_quantized(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert loaded.model.layers[0].mlp.experts.act13 == model.model.layers[0].mlp.experts.act13
    assert checkpoint_info(tmp_path / "ck").activations.startswith("int4 per token")
    # the activation specs matter: switching them off changes the logits
    for m in loaded.modules():
        if hasattr(m, "set_act_specs"):
            m.set_act_specs(None, None)
        elif isinstance(m, QuantizedLinear):
            m.act = None
    with torch.no_grad():
        assert not torch.allclose(loaded(IDS).logits, model(IDS).logits, atol=1e-3)


def test_bad_act_entry_in_config_is_named(tmp_path):
    model, _ = _act_model(act_linears=[], quantize_linears=[])
    moeq.save_quantized(model, tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["modules"]["model.layers.1.mlp.experts"]["act2"]["clip"] = 1.5
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"act2\.clip must be a number in \(0, 1\]"):
        moeq.load_quantized(tmp_path / "ck")


def test_export_and_vllm_refuse_act_quantized_checkpoints(tmp_path):
    model, _ = _act_model(act_linears=[], quantize_linears=[])
    moeq.save_quantized(model, tmp_path / "ck")
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match="quantized activations"):
            export_checkpoint(tmp_path / "ck", tmp_path / f"out-{fmt}", fmt)
    with pytest.raises(MoeqServingError, match="quantizes activations"):
        refuse_act_quant(model.config.quantization_config)
    weight_only = tiny_model("qwen2_moe")
    moeq.quantize_model(weight_only, moeq.QuantConfig(group_size=32))
    refuse_act_quant(weight_only.config.quantization_config)  # weight-only: served


def test_act_off_changes_nothing():
    a, b = tiny_model("olmoe"), tiny_model("olmoe")
    moeq.quantize_model(a, moeq.QuantConfig(group_size=32))
    moeq.quantize_model(b, moeq.QuantConfig(group_size=32, act_bits=8, act_clip=1.0))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "act13" not in a.config.quantization_config["modules"]["model.layers.0.mlp.experts"]
    with torch.no_grad():
        assert not torch.equal(a(IDS).logits, b(IDS).logits)


# ---- clip search ---------------------------------------------------------------------------------------------------
def test_search_clip_picks_the_smallest_error_and_ties_go_to_the_larger_ratio():
    ref = [torch.zeros(3)]
    inputs = [()]
    err = {1.0: 3.0, 0.9: 1.0, 0.8: 1.0, 0.7: 2.0}  # constructed: 0.9 and 0.8 tie at the minimum
    best, errs = search_clip(lambda c: (lambda: torch.full((3,), err[c] ** 0.5 / 3 ** 0.5)), ref, inputs, list(err))
    assert best == 0.9
    torch.testing.assert_close(torch.tensor([errs[c] for c in err]), torch.tensor(list(err.values())))


def test_linear_clip_search_matches_a_brute_force_float64_search():
    """Gaussian tokens at 4 bits: clipping the few largest values below absmax pays off (finer steps for the bulk);
    the chosen ratio must be the grid point with the smallest output error, computed independently in float64."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=gen)
    lin = QuantizedLinear.from_packed(rtn_quantize(w, moeq.WeightSpec(8, 64), torch.float16), backend="reference")
    x = torch.randn(64, 64, generator=gen)
    grid = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    dense = lin(torch.eye(64)).T.double()
    ref = x.double() @ dense.T
    brute = {}
    for c in grid:
        s = x.double().abs().amax(-1, keepdim=True) * c / 7
        brute[c] = float(((torch.round(x.double() / s).clamp(-7, 7) * s @ dense.T - ref) ** 2).sum())
    res = search_linear_clip(lin, [x], ActSpec(4), grid, "cpu")
    assert res["act_clip"] == min(grid, key=lambda c: (brute[c], -c)) and res["act_clip"] < 1.0
    assert lin.act == ActSpec(4, "int", res["act_clip"])
    for c in grid:
        assert abs(res["act_sq_error"][f"{c:g}"] - brute[c]) <= 1e-3 * brute[c]


def test_experts_clip_search_sets_the_best_specs():
    model = tiny_model("mixtral")
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    ex = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, ex.hidden_dim, generator=gen)
    idx = torch.stack([torch.randperm(ex.num_experts, generator=gen)[:2] for _ in range(40)])
    wts = torch.rand(40, 2, generator=gen)
    res = search_experts_clips(ex, [(h, idx, wts)], ActSpec(4), [1.0, 0.9, 0.8, 0.6], "cpu")
    assert ex.act13.clip == res["act13_clip"] and ex.act2.clip == res["act2_clip"]
    assert res["act13_sq_error"][f"{res['act13_clip']:g}"] == min(res["act13_sq_error"].values())
    assert res["act2_sq_error"][f"{res['act2_clip']:g}"] == min(res["act2_sq_error"].values())
    # the down search ran with the chosen gate_up spec: its 1.0 entry is the error of (act13 chosen, act2 absmax)
    ex.set_act_specs(ActSpec(4, "int", res["act13_clip"]), ActSpec(4))
    with torch.no_grad():
        ref = copy.deepcopy(ex)
        ref.set_act_specs(None, None)
        e = float((ex(h, idx, wts).float() - ref(h, idx, wts).float()).pow(2).sum())
    assert abs(e - res["act2_sq_error"]["1"]) <= 1e-5 * e


def test_act_clip_search_needs_calibration():
    with pytest.raises(ValueError, match="act_clip_search needs calibration"):
        moeq.quantize_model(tiny_model("olmoe"), moeq.QuantConfig(group_size=32, act_bits=8, act_clip_search=True))


# ---- Hessians from quantized activations ----------------------------------------------------------------------
def test_calib_experts_hessian_of_fake_quantized_inputs():
    from moeq_kernels.act_quant import fake_quant_act

    model = tiny_model("qwen3_moe")
    block = model.model.layers[0].mlp
    ex = block.experts
    hidden = torch.randn(12, ex.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(0))
    _, wts, idx = block.gate(hidden)
    spec = ActSpec(4, "int", 0.9)
    fp = CalibExperts(ex.gate_up_proj, block.gate, "gate_up", "none")
    aq = CalibExperts(ex.gate_up_proj, block.gate, "gate_up", "none", act13=spec)
    fp(hidden, idx, wts)
    aq(hidden, idx, wts)
    e = int(idx[0, 0])
    xq = fake_quant_act(hidden, spec)[(idx == e).any(-1)]
    torch.testing.assert_close(aq.hessians.get(e).h, xq.T @ xq, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(aq.hessians.get(e).h, fp.hessians.get(e).h)


def test_gptq_with_act_hessian_quantized_differs_from_fp_hessians():
    def run(act_hessian):
        model = tiny_model("olmoe")
        moeq.quantize_model(model, moeq.QuantConfig(method="gptq", group_size=32, act_bits=4,
                                                    act_hessian=act_hessian), calib=CALIB)
        return model.model.layers[0].mlp.experts.w13_qweight

    fp_hess = tiny_model("olmoe")
    moeq.quantize_model(fp_hess, moeq.QuantConfig(method="gptq", group_size=32), calib=CALIB)
    assert torch.equal(run("fp"), fp_hess.model.layers[0].mlp.experts.w13_qweight)  # QuaRot convention: same GPTQ
    assert not torch.equal(run("quantized"), fp_hess.model.layers[0].mlp.experts.w13_qweight)


def test_mixed_precision_experts_carry_act_specs_through_a_checkpoint(tmp_path):
    model = tiny_model("qwen3_moe")
    plan = {f"model.layers.{i}.mlp.experts": {"gate_up": [4, 8] * 4, "down": [4, 8] * 4} for i in range(2)}
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32, expert_bits=plan, act_bits=8, act_clip_search=True),
                        calib=CALIB)
    ex = model.model.layers[0].mlp.experts
    assert len(ex.groups) == 2 and all(g.act13 == ex.act13 and g.act13 is not None for g in ex.groups)
    moeq.save_quantized(model, tmp_path / "ck")
    loaded = moeq.load_quantized(tmp_path / "ck")
    assert [g.act2 for g in loaded.model.layers[0].mlp.experts.groups] == [g.act2 for g in ex.groups]
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_cli_quantize_info_eval_with_fp8_activations(fp_dir, tmp_path, capsys):
    from moeq.cli import main

    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(fp_dir), "--out", str(out), "--group-size", "32", "--dtype", "float32",
                 "--act-bits", "8", "--act-format", "fp8_e4m3", "--act-clip-search", "--calib", str(text),
                 "--nsamples", "4", "--seqlen", "32"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "activations: fp8 e4m3 per token" in capsys.readouterr().out
    assert main(["eval", "--model", str(out), "--ppl", str(text), "--seqlen", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["quantize", "--model", str(fp_dir), "--out", str(tmp_path / "q2"), "--act-bits", "8",
                 "--act-clip-search"]) == 2
    assert "--act-clip-search needs --calib" in capsys.readouterr().err
