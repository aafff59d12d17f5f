"""Golden digests: RTN, GPTQ and AGQ outputs stay bit-identical across refactors of the quantizers.

``golden_digests.json`` holds, per case (model x method x setting), the sha256 of every packed tensor
(``qweight`` / ``scales`` / ``qzeros`` of every quantized module, in sorted key order) recorded before the
speed work of issue #20. The test recomputes them; any change of a single bit in any code or scale fails.

Threads are pinned to 1 while digests are computed: GPTQ's Hessian accumulation and matmuls are fp32 sums
whose order (hence last bits) may depend on the thread count. Regenerate (only when a change of results is
intended and explained): ``python tests/moeq/test_golden.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moeq
from moeq.testing import TINY_CONFIGS, tiny_model

GOLDEN = Path(__file__).with_name("golden_digests.json")
_PACKED = ("qweight", "scales", "qzeros")  # suffixes: QuantizedLinear.qweight, QuantizedExperts.gate_up_qweight

# (name, QuantConfig kwargs); the demo model has K in {128, 256}, the tiny models K in {32, 64}
DEMO_CASES = [
    ("rtn_w4g128", dict(method="rtn", bits=4, group_size=128)),
    ("rtn_w3g128_asym_linears", dict(method="rtn", bits=3, group_size=128, sym=False,
                                     quantize_linears=["attention", "shared_experts"])),
    ("gptq_w4g128", dict(method="gptq", bits=4, group_size=128)),
    ("gptq_w3g128_asym", dict(method="gptq", bits=3, group_size=128, sym=False)),
    ("gptq_w4g128_actorder_linears", dict(method="gptq", bits=4, group_size=128, act_order=True,
                                          quantize_linears=["attention", "shared_experts"])),
    ("agq_w3g128", dict(method="agq", bits=3, group_size=128)),
]
TINY_CASES = [
    ("rtn_w4g32", dict(method="rtn", bits=4, group_size=32)),
    ("gptq_w3g32", dict(method="gptq", bits=3, group_size=32)),
    ("gptq_w4g32_asym_actorder", dict(method="gptq", bits=4, group_size=32, sym=False, act_order=True)),
    ("agq_w4g32_rtnfallback", dict(method="agq", bits=4, group_size=32, sparse_expert_fallback="rtn")),
]


def _calib(nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Fixed random byte ids ``[nsamples, seqlen]`` int64 (every model here has a 256-id vocabulary)."""
    return torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def packed_digests(model) -> dict[str, str]:
    """sha256 (hex) of every packed tensor of ``model``, keyed by state-dict name, in sorted order."""
    sd = model.state_dict()
    out = {}
    for key in sorted(k for k in sd if k.endswith(_PACKED)):
        t = sd[key].detach().cpu().contiguous()
        out[key] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def _case_digest(model, kwargs: dict, calib: torch.Tensor) -> str:
    """One sha256 over the per-tensor digests (keys included) after quantizing ``model`` in place."""
    cfg = moeq.QuantConfig(**kwargs)
    moeq.quantize_model(model, cfg, calib=None if kwargs["method"] == "rtn" else calib)
    digests = packed_digests(model)
    if not digests:
        raise AssertionError("no packed tensors found")
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def compute_all() -> dict[str, str]:
    """Digest of every case, computed with one thread (see the module docstring)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        demo_calib = _calib(4, 64, seed=0)
        for name, kw in DEMO_CASES:
            model = AutoModelForCausalLM.from_pretrained(moeq.demo_model_path(), dtype=torch.float32).eval()
            out[f"demo/{name}"] = _case_digest(model, kw, demo_calib)
        tiny_calib = _calib(2, 32, seed=1)
        for family in sorted(TINY_CONFIGS):
            for name, kw in TINY_CASES:
                out[f"{family}/{name}"] = _case_digest(tiny_model(family), kw, tiny_calib)
        return out
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def computed():
    return compute_all()


def test_golden_file_covers_every_case():
    golden = json.loads(GOLDEN.read_text())
    expected = {f"demo/{n}" for n, _ in DEMO_CASES} | {f"{f}/{n}" for f in TINY_CONFIGS for n, _ in TINY_CASES}
    assert set(golden) == expected


def test_outputs_bit_identical_to_golden(computed):
    golden = json.loads(GOLDEN.read_text())
    changed = sorted(k for k in golden if computed.get(k) != golden[k])
    assert not changed, f"packed outputs changed for {changed}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        GOLDEN.write_text(json.dumps(compute_all(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps(compute_all(), indent=1, sort_keys=True))
