"""EBSS: the balance term against numpy, degeneration checks, the beam search's bookkeeping against a plain
forward pass, the balance it buys on the demo model, and the JSONL path into ``moeq quantize``."""

import json

import numpy as np
import pytest
import torch

from moeq.assets import demo_model_path
from moeq.calib import ebss as ebss_mod
from moeq.calib.data import load_jsonl, random_windows
from moeq.calib.ebss import (EBSSConfig, compression_ratio, degeneracy, ebss_generate, expert_balance_sigma,
                             sidecar_path, tail_period, write_jsonl)
from moeq.calib.stdlib import stdlib_text
from moeq.cli import main
from moeq.eval.routing import RouterTap, expert_counts

N, L = 8, 64  # small but enough for the balance comparison to be far outside its noise


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield



@pytest.fixture(scope="module")
def generated(demo):
    model, tok = demo
    return ebss_generate(model, tok, EBSSConfig(nsamples=N, seqlen=L, beam=3, candidates=3, tau=0.05, batch=N, seed=0),
                         progress=False)


def test_sigma_matches_numpy_with_ddof_correction():
    counts = torch.randint(0, 50, (3, 5, 4, 8))
    frac = counts.numpy() / counts.numpy().sum(-1, keepdims=True)
    want = np.std(frac, axis=-1, ddof=1).mean(-1)  # E/(E-1)-corrected variance, averaged over layers
    np.testing.assert_allclose(expert_balance_sigma(counts).numpy(), want, rtol=1e-12)
    assert float(expert_balance_sigma(torch.full((4, 8), 7))) == 0.0  # perfectly balanced
    collapsed = torch.tensor([[10, 10, 0, 0, 0, 0, 0, 0]])  # top-2 always on the same two experts
    assert float(expert_balance_sigma(collapsed)) == pytest.approx(np.std([0.5, 0.5, 0, 0, 0, 0, 0, 0], ddof=1))


def test_planted_degenerate_sequences_are_rejected():
    code = stdlib_text("heldout", max_bytes=256)
    ids = list(code.encode())
    assert degeneracy(ids, code) is None and compression_ratio(code) > 0.2
    loop = "return self._file\n" * 15
    assert degeneracy(list(loop.encode()), loop) == "repetitive"
    # fluent start, then stuck: compresses fine overall, but the last 64 tokens repeat with period 6
    tail = code[:200] + "a = 1\n" * 11
    assert compression_ratio(tail) > 0.2 and tail_period(list(tail.encode()), 64) == 6
    assert degeneracy(list(tail.encode()), tail) == "loop"


def test_search_bookkeeping_matches_a_plain_forward(demo, generated):
    """The cached, batched beam search must report the mean log-prob and routing sigma that a fresh
    full-sequence forward of the chosen tokens gives."""
    model, tok = demo
    assert len(generated.samples) == N and generated.summary["accepted"] == N
    ids = torch.tensor([s["input_ids"] for s in generated.samples])
    assert ids.shape == (N, L)
    with torch.no_grad(), RouterTap(model) as tap:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        counts = tap.counts().reshape(N, L, len(tap.layers), tap.num_experts).sum(1)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].double().mean(1)
    np.testing.assert_allclose([s["mean_logprob"] for s in generated.samples], lp.numpy(), atol=2e-4)
    np.testing.assert_allclose([s["sigma"] for s in generated.samples], expert_balance_sigma(counts).numpy(), atol=1e-9)
    assert generated.summary["expert_counts"] == counts.sum(0).tolist()
    assert all(s["text"] == tok.decode(s["input_ids"]) for s in generated.samples)
    # every sample starts with a printable token and is fluent (the model's own mean log-prob per byte on its
    # held-out text is about -1.6)
    assert all(tok.decode(s["input_ids"][:1]).isprintable() for s in generated.samples)
    assert generated.summary["mean_logprob"] > -1.3


def test_ebss_is_more_balanced_than_plain_text(demo, generated):
    model, tok = demo
    train = torch.tensor(tok(stdlib_text("train", max_bytes=200_000))["input_ids"])
    text_sigma = float(expert_balance_sigma(expert_counts(model, random_windows(train, N, L, seed=0), L)))
    ebss_sigma = generated.summary["dataset_sigma"]
    assert ebss_sigma < 0.85 * text_sigma, (ebss_sigma, text_sigma)


def test_rejected_samples_are_counted_and_replaced(demo, monkeypatch):
    model, tok = demo
    real = ebss_mod._search
    planted = torch.tensor(list(("ab" * L).encode()))[:L]

    def search_with_a_loop(model, tap, first, cfg, gen):
        toks, mlp, sig, cnt = real(model, tap, first, cfg, gen)
        if toks.shape[0] > 1:
            toks[0] = planted[: toks.shape[1]]  # the first sample of every group of two is degenerate
        return toks, mlp, sig, cnt

    monkeypatch.setattr(ebss_mod, "_search", search_with_a_loop)
    res = ebss_generate(model, tok, EBSSConfig(nsamples=3, seqlen=32, beam=2, batch=2, seed=1), progress=False)
    # groups of 2, 2, then 1 (the last one left): two planted loops rejected and regenerated
    assert res.summary["rejected"] == {"repetitive": 2, "loop": 0} and res.summary["generated"] == 5
    assert len(res.samples) == 3 and all(s["input_ids"] != planted.tolist() for s in res.samples)


def test_seeded_and_jsonl_round_trip(demo, generated, tmp_path):
    model, tok = demo
    cfg = EBSSConfig(nsamples=2, seqlen=16, beam=2, seed=3)
    a, b = (ebss_generate(model, tok, cfg, progress=False) for _ in range(2))
    assert a.samples == b.samples  # same seed, same samples
    assert a.samples != ebss_generate(model, tok, EBSSConfig(nsamples=2, seqlen=16, beam=2, seed=4), progress=False).samples
    side = write_jsonl(generated, tmp_path / "calib.jsonl")
    assert side == sidecar_path(tmp_path / "calib.jsonl") == tmp_path / "calib.summary.json"
    assert json.loads(side.read_text())["rejected_total"] == 0
    lines = (tmp_path / "calib.jsonl").read_text().splitlines()
    assert len(lines) == N and set(json.loads(lines[0])) >= {"input_ids", "text", "mean_logprob", "sigma"}
    # longer than the file's sequences: right-padded and masked; shorter: truncated
    long = load_jsonl(tmp_path / "calib.jsonl", seqlen=L + 16, nsamples=4)
    assert long["input_ids"].shape == (4, L + 16) and long["attention_mask"].sum(1).tolist() == [L] * 4
    assert long["input_ids"][0, :L].tolist() == generated.samples[0]["input_ids"]
    short = load_jsonl(tmp_path / "calib.jsonl", seqlen=16)
    assert short["input_ids"].shape == (N, 16) and bool(short["attention_mask"].all())


def test_cli_calibrate_then_quantize_with_jsonl(tmp_path, capsys):
    out = tmp_path / "ebss.jsonl"
    assert main(["calibrate", "--model", str(demo_model_path()), "--method", "ebss", "--nsamples", "3", "--seqlen",
                 "24", "--beam", "2", "--tau", "0.05", "--out", str(out)]) == 0
    msg = capsys.readouterr().out
    assert "rejected 0" in msg and "sigma" in msg and len(out.read_text().splitlines()) == 3
    q = tmp_path / "q"
    # seqlen 32 > 24 generated tokens: 8 padded positions per sample must be masked out of the calibration
    assert main(["quantize", "--model", str(demo_model_path()), "--out", str(q), "--method", "agq", "--calib",
                 str(out), "--nsamples", "3", "--seqlen", "32", "--dtype", "float32"]) == 0
    qc = json.loads((q / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["_samples"] == {"nsamples": 3, "seqlen": 32, "tokens": 72, "source": str(out)}
    assert main(["calibrate", "--model", str(demo_model_path()), "--out", str(tmp_path / "x.txt")]) == 2
    assert "must be a .jsonl" in capsys.readouterr().err
