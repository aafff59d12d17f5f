"""Routing agreement (``moeq eval --reference``) and the optional lm-eval hook's error path."""

import copy
import sys

import pytest
import torch

import moeq
from moeq.cli import main
from moeq.eval.lm_eval import LMEvalNotInstalled, run_lm_eval
from moeq.eval.routing import RouterTap, collect_routes, expert_counts, routing_agreement
from moeq.testing import tiny_model, tiny_tokenizer



@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


TEXT = "def add(a, b):\n    return a + b\n\nclass A:\n    x = [1, 2, 3]\n" * 30


def _perturbed(model, scale=0.05, seed=0):
    """A copy whose attention weights carry noise, so hidden states (and some routing) change."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if "self_attn" in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


@pytest.fixture(scope="module")
def model_ids():
    return tiny_model("qwen2_moe"), torch.tensor(tiny_tokenizer()(TEXT)["input_ids"])


def test_self_agreement_is_one(model_ids):
    model, ids = model_ids
    res = routing_agreement(model, copy.deepcopy(model), ids, 64)
    assert res["topk_overlap"] == 1.0 and res["exact_match"] == 1.0
    assert [d["layer"] for d in res["layers"]] == [0, 1] and res["tokens"] == ids.numel() // 64 * 64


def test_agreement_matches_a_brute_force_set_count(model_ids):
    model, ids = model_ids
    other = _perturbed(model)
    res = routing_agreement(other, model, ids, 64)
    assert res["topk_overlap"] < 1.0 and res["exact_match"] < res["topk_overlap"] + 1e-12
    a, b = collect_routes(other, ids, 64), collect_routes(model, ids, 64)
    k = a["k"]
    for d in res["layers"]:
        ra, rb = a["routes"][d["layer"]].tolist(), b["routes"][d["layer"]].tolist()
        overlap = sum(len(set(x) & set(y)) for x, y in zip(ra, rb)) / (k * len(ra))
        exact = sum(set(x) == set(y) for x, y in zip(ra, rb)) / len(ra)
        assert d["topk_overlap"] == pytest.approx(overlap) and d["exact_match"] == pytest.approx(exact)


def test_router_tap_counts_tokens_times_k(model_ids):
    model, ids = model_ids
    with RouterTap(model) as tap:
        model(input_ids=ids[None, :50])
        assert tap.counts().shape == (50, 2, 8) and int(tap.counts().sum()) == 50 * 2 * 2
    assert not tap._handles  # hooks removed
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    c = expert_counts(model, ids[:80].reshape(2, 40), 40, attention_mask=mask)
    assert int(c.sum()) == 70 * 2 * 2  # padded positions are not counted


def test_cli_eval_with_reference(model_ids, tmp_path, capsys):
    model, _ = model_ids
    fp_dir, q_dir = tmp_path / "fp", tmp_path / "q"
    model.save_pretrained(fp_dir)
    tiny_tokenizer().save_pretrained(fp_dir)
    q = copy.deepcopy(model)
    moeq.quantize_model(q, moeq.QuantConfig(bits=2, group_size=32))
    moeq.save_quantized(q, q_dir, tokenizer=tiny_tokenizer())
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["eval", "--model", str(q_dir), "--ppl", str(tmp_path / "t.txt"), "--seqlen", "64",
                 "--reference", str(fp_dir)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("layer", "mean"))]
    assert len(lines) == 3 and "perplexity" in out and "routing agreement" in out
    mean = float(lines[-1].split("top-k overlap")[1].split(",")[0])
    assert 0.5 < mean < 1.0  # 2-bit experts move the hidden states of layer 1's router
    assert main(["eval", "--model", str(fp_dir), "--ppl", str(tmp_path / "t.txt"), "--seqlen", "64",
                 "--reference", str(fp_dir)]) == 0
    assert "mean     : top-k overlap 1.0000, exact set match 1.0000" in capsys.readouterr().out


def test_lm_eval_missing_is_a_clear_error(model_ids, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError, installed or not
    with pytest.raises(LMEvalNotInstalled, match="pip install lm-eval"):
        run_lm_eval(model_ids[0], tiny_tokenizer(), ["hellaswag"])
    model_ids[0].save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    capsys.readouterr()  # drop the save progress bars
    assert main(["eval", "--model", str(tmp_path), "--lm-eval", "local_task"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeq: error: lm-evaluation-harness is not installed") and err.count("\n") == 1
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "--ppl FILE and/or --lm-eval" in capsys.readouterr().err
