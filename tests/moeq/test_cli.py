"""The moeq command line: quantize -> info -> eval on a local checkpoint, and one-line errors."""

import json
import math
import re

import pytest
import torch

import moeq
from moeq.cli import main
from moeq.eval.perplexity import perplexity, windows
from moeq.testing import tiny_model, tiny_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\n" * 40


def test_quantize_info_eval(fp_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(fp_dir), "--out", str(out), "--bits", "4", "--group-size", "32",
                 "--dtype", "float32"]) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits"] == 4 and abs(info["bits_per_weight"] - 4.5) < 1e-6  # 4 bits + bf16 scale per 32
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", "--model", str(out), "--ppl", str(text), "--seqlen", "64"]) == 0
    line = capsys.readouterr().out
    ppl = float(line.split()[1])
    assert 1.0 < ppl < 1000 and "windows" in line


@pytest.mark.parametrize("method", ["gptq", "agq"])
def test_quantize_with_calibration_text(fp_dir, tmp_path, method):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(fp_dir), "--out", str(out), "--method", method, "--group-size", "32",
                 "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--quantize-linears", "attention"]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["method"] == method and q["calibration"]["_samples"] == {"nsamples": 4, "seqlen": 32, "tokens": 128,
                                                                      "source": str(text)}
    assert q["linear_modules"] and sum(q["calibration"]["model.layers.0.mlp.experts"]["tokens"]) == 128 * 2


def test_gptq_without_calibration_file_is_a_user_error(fp_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(fp_dir), "--out", str(tmp_path), "--method", "gptq"]) == 2
    assert "needs --calib FILE" in capsys.readouterr().err


def test_perplexity_follows_gptq_convention(fp_dir):
    # exp(mean NLL) over non-overlapping windows == exp(mean of the model's own per-window losses)
    model = tiny_model("qwen2_moe")
    ids = torch.tensor(tiny_tokenizer()(TEXT)["input_ids"])
    res = perplexity(model, ids, seqlen=32, batch_size=3)
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows(ids, 32)]
    assert res["windows"] == len(ids) // 32 and res["tokens"] == res["windows"] * 31
    assert math.isclose(res["ppl"], math.exp(sum(losses) / len(losses)), rel_tol=1e-5)


@pytest.mark.parametrize("argv,match", [
    (["quantize", "--model", "/nonexistent", "--out", "x"], "model directory not found"),
    (["info", "/nonexistent"], "not a directory"),
    (["eval", "--model", "/nonexistent", "--ppl", "x.txt"], "model directory not found"),
])
def test_user_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeq: error:") and match in err and err.count("\n") == 1


def test_unsupported_model_is_refused_before_loading(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, vocab_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    assert main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "q")]) == 2
    assert "not supported by moeq; supported: deepseek_v2" in capsys.readouterr().err


def test_eval_without_tokenizer_says_so(tmp_path, capsys):
    tiny_model("olmoe").save_pretrained(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["eval", "--model", str(tmp_path), "--ppl", str(tmp_path / "t.txt")]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # Quantized model vs a fake-quant copy (the dequantized weights in transformers' own experts): the same
    # products summed in another order (transformers 5.23's grouped_mm), so fp32 rounding, not bit equality.
    diff, peak = re.search(r"fake-quant max \|diff\| (\S+);.*\(max \|logit\| (\S+)\)", out).groups()
    assert float(diff) <= 1e-5 * float(peak), out
    assert "generate:" in out


def test_every_config_field_has_a_flag_or_is_listed_api_only():
    """The flag table (moeq/cli_flags.py) is the one place a setting reaches the CLI: a new QuantConfig field
    must get a row there or be listed in NOT_ON_CLI."""
    import dataclasses

    from moeq.cli_flags import NOT_ON_CLI, QUANT_FLAGS

    fields = {f.name for f in dataclasses.fields(moeq.QuantConfig)}
    on_cli = {f.field for f in QUANT_FLAGS if f.field}
    assert fields == on_cli | NOT_ON_CLI and not on_cli & NOT_ON_CLI


def test_flags_map_onto_the_config():
    from moeq.cli import build_parser
    from moeq.cli_flags import quant_config

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "agq", "--bits", "3",
                                      "--asym", "--no-clip", "--rotate", "--no-online-hadamard", "--fallback", "rtn",
                                      "--override", 'model.layers.0.mlp.experts.down={"bits": 8}', "--smooth"])
    c = quant_config(args)
    assert (c.method, c.bits, c.sym, c.w_clip, c.rotation, c.online_hadamard, c.sparse_expert_fallback, c.smooth) == \
        ("agq", 3, False, False, "hadamard", False, "rtn", True)
    assert c.overrides == {"model.layers.0.mlp.experts.down": {"bits": 8}}
    assert quant_config(build_parser().parse_args(["quantize", "--model", "m", "--out", "o"])) == moeq.QuantConfig()
