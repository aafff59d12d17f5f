"""Calibration tokens per expert: the stats against a hand count, the quantizer's per-layer log line against its
own metadata, and ``moeq calibrate --compare-text`` putting plain-text stats of the same size in the summary."""

import json
import logging

import pytest
import torch

import moeq
from moeq.assets import demo_model_path
from moeq.calib.expert_tokens import expert_token_stats, format_token_stats, layer_token_stats, summarize_layers
from moeq.calib.stdlib import stdlib_text
from moeq.cli import main
from moeq.eval.routing import expert_counts
from moeq.testing import tiny_model


def test_stats_match_a_hand_count():
    counts = [0, 3, 40, 7, 12, 1, 90, 5]  # 158 routed slots of 79 top-2 tokens
    s = expert_token_stats(counts, total_tokens=79, threshold_frac=0.05)  # threshold 3.95 tokens
    assert s == {"min": 0, "median": 6.0, "max": 90, "threshold": pytest.approx(3.95), "under_threshold": 3,
                 "zero": 1, "experts": 8, "total_tokens": 79}
    assert expert_token_stats(torch.tensor([4, 4, 9]), 6, threshold=4)["under_threshold"] == 0  # strictly fewer
    assert expert_token_stats([1, 2, 3], 3)["median"] == 2.0
    line = format_token_stats(s)
    assert "min 0 / median 6 / max 90" in line and "3 of 8 experts under 4.0 (1 with none) of 79 tokens" in line
    rows = layer_token_stats(torch.tensor([counts, [10] * 8]), 79, [3, 5], threshold_frac=0.05)
    assert [r["layer"] for r in rows] == [3, 5] and rows[1]["under_threshold"] == 0
    assert summarize_layers(rows) == {"min": 0, "min_median": 6.0, "under_threshold": 3, "zero": 1, "experts": 16}
    with pytest.raises(ValueError, match=r"\[n_moe_layers, E\]"):
        layer_token_stats(torch.tensor(counts), 79)
    with pytest.raises(ValueError, match="2 layer indices for 1 rows"):
        layer_token_stats(torch.tensor([counts]), 79, [0, 1])


def test_quantize_logs_tokens_per_expert_once_per_layer(caplog):
    model = tiny_model("qwen2_moe")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="moeq.runner"):
        report = moeq.quantize_model(model, moeq.QuantConfig(method="gptq", bits=4, group_size=32), calib=calib)
    lines = [r.getMessage() for r in caplog.records
             if r.name == "moeq.runner" and "tokens per expert" in r.getMessage()]
    assert len(lines) == 2  # one per MoE layer
    for i, line in enumerate(lines):
        meta = report.calibration[f"model.layers.{i}.mlp.experts"]
        want = expert_token_stats(meta["tokens"], meta["total_tokens"], threshold=meta["threshold"])
        assert line == f"model.layers.{i}.mlp.experts: {format_token_stats(want)}"
        assert want["total_tokens"] == 128 and sum(meta["tokens"]) == 2 * 128  # top-2


def test_calibrate_compare_text_reports_plain_text_of_the_same_size(tmp_path, capsys):
    text = tmp_path / "code.txt"
    text.write_text(stdlib_text("train", max_bytes=20_000))
    out = tmp_path / "ebss.jsonl"
    assert main(["calibrate", "--model", str(demo_model_path()), "--nsamples", "3", "--seqlen", "24", "--beam", "2",
                 "--compare-text", str(text), "--out", str(out)]) == 0
    msg = capsys.readouterr().out
    summary = json.loads((tmp_path / "ebss.summary.json").read_text())
    plain = summary["plain_text"]
    assert plain["source"] == str(text) and len(plain["expert_tokens"]) == 4 == len(summary["expert_tokens"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeq.calib.data import load_calibration

    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    ids = load_calibration(AutoTokenizer.from_pretrained(demo_model_path()), text, 3, 24, 0)
    counts = expert_counts(model, ids, 24)
    assert plain["expert_counts"] == counts.tolist()
    assert plain["expert_tokens"] == layer_token_stats(counts, 72, [0, 1, 2, 3])
    for st, p in zip(summary["expert_tokens"], plain["expert_tokens"]):
        assert (f"layer {st['layer']}: tokens per expert min {st['min']} / median {st['median']:g}, "
                f"{st['under_threshold']} of 8 experts under 0.4 (plain text: min {p['min']} / median "
                f"{p['median']:g}, {p['under_threshold']} under)") in msg
