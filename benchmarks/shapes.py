"""Model-shape registry of the benchmarks: real MoE models' expert and model dimensions.

Each :class:`ModelShape` carries what the layer benchmark needs (``E, H, I, top_k``) and what a model
benchmark needs to build a real transformers v5 config (layers, attention dims, vocabulary, family-specific
fields). Sources: each model's published ``config.json`` (Hugging Face hub), cross-checked against public
copies of those files quoted in other projects' test fixtures and against the defaults of the transformers
config classes (``MixtralConfig`` and ``OlmoeConfig`` defaults are Mixtral-8x7B and OLMoE-1B-7B except where
noted). Only the fields that change the computation are recorded; everything else keeps the config class
default.

Usage::

    from benchmarks.shapes import SHAPES, get_shape
    s = get_shape("Qwen3-30B-A3B")
    cfg = s.config(num_layers=4)                 # transformers Qwen3MoeConfig, real dims, 4 layers
    tiny = s.scaled()                            # same structure, dims small enough for a CPU
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The four shapes of the project's anchors (docs/architecture.md, ANCHORS.md): the default layer benchmark set.
ANCHOR_SHAPES = ("Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V2-Lite", "OLMoE-1B-7B")


def _rope(theta: float, **scaling) -> dict:
    # transformers v5 (5.17 and 5.23) keep RoPE settings in one ``rope_parameters`` dict.
    return {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": theta, **scaling}


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of one MoE model.

    Attributes:
        name: display name, e.g. ``"Mixtral-8x7B"``.
        experts_family: transformers ``model_type`` whose experts module computes this model's routed experts
            (the bf16 baseline of the layer benchmark is that family's ``...Experts`` class).
        model_type: transformers ``model_type`` of the whole model for model benchmarks, or None when
            transformers has no class for it (DeepSeek-MoE-16B is remote code only).
        num_experts, hidden, intermediate, top_k: routed experts ``E``, hidden ``H``, expert intermediate ``I``
            (gate_up is ``[E, 2I, H]``, down ``[E, H, I]``), experts per token ``k``.
        num_layers, num_heads, num_kv_heads, head_dim, vocab_size, max_positions: model dims.
        shared_intermediate: total width of the shared expert(s) (0 = none).
        extra: family-specific config kwargs (norm_topk_prob, MLA ranks, dense first layers, RoPE, ...).
    """

    name: str
    experts_family: str
    model_type: str | None
    num_experts: int
    hidden: int
    intermediate: int
    top_k: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    shared_intermediate: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def ehik(self) -> tuple[int, int, int, int]:
        """``(E, H, I, k)``."""
        return self.num_experts, self.hidden, self.intermediate, self.top_k

    def config_kwargs(self, num_layers: int | None = None) -> dict:
        """Keyword arguments of ``AutoConfig.for_model(self.model_type, ...)`` for the real model."""
        from moeq.models.base import _ADAPTERS  # the adapter names the expert-count / width config keys

        adapter = _ADAPTERS[self.experts_family]
        kw = dict(
            hidden_size=self.hidden, num_hidden_layers=num_layers or self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            vocab_size=self.vocab_size, max_position_embeddings=self.max_positions, num_experts_per_tok=self.top_k,
            hidden_act="silu", tie_word_embeddings=False,
        )
        kw[adapter.num_experts_key] = self.num_experts
        kw[adapter.intermediate_key] = self.intermediate
        if self.experts_family in ("qwen3_moe",):
            kw["head_dim"] = self.head_dim  # Qwen3 decouples head_dim from hidden / heads
        kw.update(self.extra)
        return kw

    def config(self, num_layers: int | None = None, **overrides):
        """The transformers config of the whole model (real dims; ``num_layers`` may cut the depth)."""
        from transformers import AutoConfig

        if self.model_type is None:
            raise ValueError(f"{self.name} has no transformers model class; use its experts shape only")
        return AutoConfig.for_model(self.model_type, **{**self.config_kwargs(num_layers), **overrides})

    def experts_config(self, **overrides):
        """A config of :attr:`experts_family` with this shape's expert dims (enough to build its experts module)."""
        from transformers import AutoConfig

        kw = self.config_kwargs()
        return AutoConfig.for_model(self.experts_family, **{**kw, **overrides})

    def scaled(self, hidden: int = 256, max_experts: int = 16, max_top_k: int = 4) -> "ModelShape":
        """The same structure with dims small enough for a CPU (quick mode, CI).

        ``H -> hidden``; ``I -> 2H`` when the model's experts are wider than H, else ``1.5 H`` (384 for H=256:
        12 * 32, so the non-power-of-two Hadamard path is exercised too); both multiples of 128 so g128
        applies. Experts and top-k are capped; attention and vocabulary shrink; depth becomes 2 MoE layers
        (plus the family's dense first layers).
        """
        inter = 2 * hidden if self.intermediate > self.hidden else hidden * 3 // 2
        experts = min(self.num_experts, max_experts)
        extra = dict(self.extra)
        if self.experts_family == "deepseek_v2":
            extra.update(kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
            extra.pop("rope_parameters", None)  # YaRN over 4096 original positions makes no sense at 256
        if "shared_expert_intermediate_size" in extra:
            extra["shared_expert_intermediate_size"] = 2 * inter
        extra.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the small vocabulary
        dense = int(extra.get("first_k_dense_replace", 0))
        return dataclasses.replace(
            self, name=f"{self.name}-tiny", num_experts=experts, hidden=hidden, intermediate=inter,
            top_k=min(self.top_k, max_top_k, experts), num_layers=2 + dense, num_heads=4,
            num_kv_heads=4 if self.num_kv_heads == self.num_heads else 2,  # MLA (DeepSeek) needs kv == q heads
            head_dim=hidden // 4, vocab_size=512, max_positions=512,
            shared_intermediate=2 * inter if self.shared_intermediate else 0, extra=extra,
        )


SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    # mistralai/Mixtral-8x7B-v0.1 config.json; equals transformers' MixtralConfig defaults except max positions.
    ModelShape("Mixtral-8x7B", "mixtral", "mixtral", 8, 4096, 14336, 2, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, vocab_size=32000, max_positions=32768,
               extra=dict(rms_norm_eps=1e-5, rope_parameters=_rope(1e6))),
    # Qwen/Qwen1.5-MoE-A2.7B: 60 experts x 1408, top-4 (no renormalization), one shared expert 5632 wide with a
    # sigmoid gate, MHA 16 heads.
    ModelShape("Qwen1.5-MoE-A2.7B", "qwen2_moe", "qwen2_moe", 60, 2048, 1408, 4, num_layers=24, num_heads=16,
               num_kv_heads=16, head_dim=128, vocab_size=151936, max_positions=32768, shared_intermediate=5632,
               extra=dict(shared_expert_intermediate_size=5632, intermediate_size=5632, norm_topk_prob=False,
                          decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_parameters=_rope(1e6))),
    # Qwen/Qwen2-57B-A14B: 64 experts x 2560, top-8, shared expert 20480, GQA 28/4.
    ModelShape("Qwen2-57B-A14B", "qwen2_moe", "qwen2_moe", 64, 3584, 2560, 8, num_layers=28, num_heads=28,
               num_kv_heads=4, head_dim=128, vocab_size=151936, max_positions=131072, shared_intermediate=20480,
               extra=dict(shared_expert_intermediate_size=20480, intermediate_size=18944, norm_topk_prob=False,
                          decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_parameters=_rope(1e6))),
    # Qwen/Qwen3-30B-A3B: 128 experts x 768, top-8 renormalized, GQA 32/4 with head_dim 128 (!= 2048 / 32).
    ModelShape("Qwen3-30B-A3B", "qwen3_moe", "qwen3_moe", 128, 2048, 768, 8, num_layers=48, num_heads=32,
               num_kv_heads=4, head_dim=128, vocab_size=151936, max_positions=40960,
               extra=dict(intermediate_size=6144, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          rms_norm_eps=1e-6, rope_parameters=_rope(1e6))),
    # deepseek-ai/DeepSeek-V2-Lite: MLA (kv_lora_rank 512, no q LoRA), 64 routed x 1408 top-6 + 2 shared experts,
    # first layer dense (10944), YaRN RoPE x40 over 4096 original positions.
    ModelShape("DeepSeek-V2-Lite", "deepseek_v2", "deepseek_v2", 64, 2048, 1408, 6, num_layers=27, num_heads=16,
               num_kv_heads=16, head_dim=192, vocab_size=102400, max_positions=163840, shared_intermediate=2 * 1408,
               extra=dict(n_shared_experts=2, first_k_dense_replace=1, intermediate_size=10944, kv_lora_rank=512,
                          q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                          n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False,
                          routed_scaling_factor=1.0, rms_norm_eps=1e-6,
                          rope_parameters=_rope(10000.0, rope_type="yarn", factor=40.0, beta_fast=32.0, beta_slow=1.0,
                                                mscale=0.707, mscale_all_dim=0.707,
                                                original_max_position_embeddings=4096))),
    # deepseek-ai/deepseek-moe-16b-base: same routed experts as V2-Lite (64 x 1408, top-6, 2 shared, first layer
    # dense) but plain MHA attention and model_type "deepseek" (remote code; transformers has no class), so only
    # its experts shape is benchmarked (with the DeepSeek-V2 experts module, which computes the same thing).
    ModelShape("DeepSeek-MoE-16B", "deepseek_v2", None, 64, 2048, 1408, 6, num_layers=28, num_heads=16,
               num_kv_heads=16, head_dim=128, vocab_size=102400, max_positions=4096, shared_intermediate=2 * 1408,
               extra=dict(n_shared_experts=2, first_k_dense_replace=1, intermediate_size=10944, norm_topk_prob=False,
                          rms_norm_eps=1e-6)),
    # allenai/OLMoE-1B-7B-0924: 64 experts x 1024 (OlmoeConfig's default intermediate_size is 2048), top-8 without
    # renormalization, MHA 16 heads, vocab 50304.
    ModelShape("OLMoE-1B-7B", "olmoe", "olmoe", 64, 2048, 1024, 8, num_layers=16, num_heads=16, num_kv_heads=16,
               head_dim=128, vocab_size=50304, max_positions=4096,
               extra=dict(norm_topk_prob=False, rms_norm_eps=1e-5, rope_parameters=_rope(10000.0))),
)}


def get_shape(name: str) -> ModelShape:
    """The registry entry ``name`` (case-insensitive); ValueError listing the known names otherwise."""
    for key, shape in SHAPES.items():
        if key.lower() == name.lower():
            return shape
    raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")


def experts_bytes(e: int, h: int, i: int, bits: int = 4, group_size: int = 128, scale_bytes: int = 2) -> int:
    """Bytes of ``e`` experts' packed gate_up + down weights and scales (symmetric, no zeros)."""
    per_matrix = 3 * h * i  # gate_up is 2*I x H, down is H x I
    return e * (per_matrix * bits // 8 + per_matrix // group_size * scale_bytes)
