"""The shipped demo model: loadable offline, quantizable at g128 everywhere, actually trained; and the
deterministic stdlib text it was trained / evaluated on."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeq
from moeq.assets import demo_model_path, demo_training_record
from moeq.calib.stdlib import stdlib_files, stdlib_text
from moeq.eval.perplexity import perplexity
from moeq.eval.routing import expert_counts


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield



@pytest.fixture(scope="module")
def heldout(demo):
    return torch.tensor(demo[1](stdlib_text("heldout", max_bytes=16 * 256))["input_ids"])


def test_files_config_and_size():
    path = demo_model_path()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in path.iterdir()) < 20 * 2**20
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen2_moe" and cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.shared_expert_intermediate_size > 0 and cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1
    # every quantizable input dim is a multiple of 128, so W4/W3 g128 applies to every linear and expert
    for dim in (cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size,
                cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)):
        assert dim % 128 == 0


def test_tokenizer_is_byte_level(demo):
    _, tok = demo
    text = "def f(x):\n    return x  # é\t"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < 256 and tok.decode(ids) == text


def test_trained_not_random(demo, heldout):
    model, _ = demo
    rec = demo_training_record()
    ppl = perplexity(model, heldout, 256)["ppl"]
    # a random init sits at ~256 (uniform over bytes); training recorded about 5 on its held-out slice
    assert ppl < 8 and rec["heldout"]["ppl"] < 8 and rec["train_loss_final"] < rec["train_loss_first"] - 3
    assert model.model.layers[0].mlp.shared_expert_gate.weight.abs().sum() > 0


def test_every_expert_is_used(demo, heldout):
    counts = expert_counts(demo[0], heldout, 256)
    assert counts.shape == (4, 8) and counts.sum(1).tolist() == [heldout.numel() // 256 * 256 * 2] * 4
    assert int((counts.sum(0) == 0).sum()) == 0  # no dead expert column
    rec = demo_training_record()["expert_load"]["counts"]
    assert len(rec) == 4 and all(len(r) == 8 for r in rec)


def test_w3_g128_everywhere_costs_little(demo, heldout):
    model, _ = demo
    q = AutoModelForCausalLM.from_pretrained(demo_model_path()).eval()
    moeq.quantize_model(q, moeq.QuantConfig(method="rtn", bits=3, group_size=128,
                                            quantize_linears=["attention", "shared_experts"]))
    p_fp, p_q = perplexity(model, heldout, 256)["ppl"], perplexity(q, heldout, 256)["ppl"]
    assert p_fp < p_q < 1.2 * p_fp
    specs = q.config.quantization_config
    assert json.dumps(specs)  # serializable


def test_stdlib_splits_are_disjoint_and_deterministic():
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert len(train) > 100 and len(held) > 10 and not set(train) & set(held)
    assert stdlib_files("heldout") == held  # fixed order
    text = stdlib_text("heldout", max_bytes=10_000)
    assert len(text.encode()) <= 10_000 and text == stdlib_text("heldout", max_bytes=10_000)
    assert stdlib_text("train", max_bytes=5_000) != stdlib_text("heldout", max_bytes=5_000)
    with pytest.raises(ValueError, match="split"):
        stdlib_files("test")
