import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeq.assets import demo_model_path
from moeq.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model forwards are per-op overhead; one thread avoids OpenMP barriers that cost ~10x on a shared
    2-core CPU. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo():
    """The shipped demo model (float32, eval mode) and its tokenizer."""
    path = demo_model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A tiny full-precision Qwen2-MoE checkpoint directory with its byte tokenizer (the CLI tests' source)."""
    d = tmp_path_factory.mktemp("fp")
    tiny_model("qwen2_moe").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d
