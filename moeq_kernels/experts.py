"""``ExpertWeights``: the one structure for a layer's packed routed-expert weights on the Python side.

Every backend entry point of ``fused_experts`` (reference, Triton, CUDA) and the drop-in modules
(``moeq.nn``) pass one :class:`ExpertWeights` around instead of the op's long flat argument list. The
``torch.library`` op ``moeq::fused_experts`` keeps a flat schema (tensors and scalars only, so that
``torch.compile(fullgraph=True)`` sees one node with a fake implementation); the flat order exists once,
here: :meth:`ExpertWeights.op_args` flattens, :meth:`ExpertWeights.from_op_args` rebuilds.

Adding a field (for example an activation-quantization spec) means: the field, its flat scalars/tensors in
:data:`OP_ARG_NAMES` / :meth:`op_args` / :meth:`from_op_args`, the op schema in ``moeq_kernels.ops``, and
the attribute the backends' ``supports`` predicates read in :meth:`dispatch_attrs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeq_kernels.act_quant import ActSpec
from moeq_kernels.packing import PackedWeight

# The op's weight arguments, in schema order (moeq_kernels.ops.fused_experts, after hidden / top_k_index /
# top_k_weights and before backend).
OP_ARG_NAMES = (
    "w13_qweight", "w13_scales", "w13_qzeros", "w2_qweight", "w2_scales", "w2_qzeros",
    "w13_bits", "w13_group_size", "w2_bits", "w2_group_size", "activation", "online_hadamard",
)
# The activation-quantization scalars come after ``backend`` (all defaulted), so that positional callers of the
# older schema keep working.
ACT_ARG_NAMES = ("act13_bits", "act13_format", "act13_clip", "act2_bits", "act2_format", "act2_clip")
NO_ACT = (0, "int", 1.0)  # the flat form of "activations stay in hidden.dtype" (act bits 0)


@dataclass(frozen=True)
class ExpertWeights:
    """Packed weights of E routed experts plus what the experts compute with them.

    Attributes:
        w13: ``gate_up`` stack, logical ``[E, 2I, H]`` (rows ``[0, I)`` gate, ``[I, 2I)`` up):
            ``qweight`` int32 ``[E, 2I, H*b/32]``, ``scales`` fp16/bf16 ``[E, 2I, H/g]``, ``qzeros`` uint8
            ``[E, 2I, H/g]`` or None (format: :mod:`moeq_kernels.packing`).
        w2: ``down`` stack, logical ``[E, H, I]`` (``qweight`` ``[E, H, I*b/32]``, ...).
        activation: gate activation, a key of ``moeq_kernels.reference.experts.ACTIVATIONS``.
        online_hadamard: the down input is multiplied by the orthonormal Hadamard ``H_I / sqrt(I)`` at run
            time (the offline ``W_down H_I`` is folded into ``w2``).
        act13: dynamic per-token quantization of the ``gate_up`` input (:mod:`moeq_kernels.act_quant`), or
            None (16-bit activations).
        act2: the same for the ``down`` input, applied after the online Hadamard.

    ``group_size`` of each stack is whatever the caller stores (-1 or K for per-channel); backends resolve it.
    No validation here (construction runs in every forward, also under tracing): the backends check what
    they need, :meth:`validate` checks everything.
    """

    w13: PackedWeight
    w2: PackedWeight
    activation: str = "silu"
    online_hadamard: bool = False
    act13: ActSpec | None = None
    act2: ActSpec | None = None

    @property
    def num_experts(self) -> int:
        return self.w13.qweight.shape[0]

    @property
    def hidden_dim(self) -> int:
        return self.w2.qweight.shape[1]

    @property
    def intermediate_dim(self) -> int:
        """``I``, from the down stack's packed width (``K = words * 32 / bits``)."""
        return self.w2.qweight.shape[-1] * 32 // self.w2.bits

    @property
    def has_zeros(self) -> bool:
        return self.w13.qzeros is not None or self.w2.qzeros is not None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistency (each stack's tensors, then the two stacks)."""
        self.w13.validate()
        self.w2.validate()
        e, two_i, h = self.w13.shape
        if self.w2.shape != (e, h, two_i // 2) or two_i % 2:
            raise ValueError(f"down stack {self.w2.shape} does not match gate_up stack {self.w13.shape} "
                             f"(expected [E, H, I] = {(e, h, two_i // 2)})")

    def op_args(self) -> tuple:
        """The flat weight arguments of ``moeq::fused_experts``, in :data:`OP_ARG_NAMES` order."""
        a, b = self.w13, self.w2
        return (a.qweight, a.scales, a.qzeros, b.qweight, b.scales, b.qzeros,
                a.bits, a.group_size, b.bits, b.group_size, self.activation, self.online_hadamard)

    def act_args(self) -> tuple:
        """The op's activation-quantization scalars, in :data:`ACT_ARG_NAMES` order (after ``backend``)."""
        return (*_flat_act(self.act13), *_flat_act(self.act2))

    @classmethod
    def from_op_args(cls, w13_qweight, w13_scales, w13_qzeros, w2_qweight, w2_scales, w2_qzeros,
                     w13_bits, w13_group_size, w2_bits, w2_group_size, activation="silu",
                     online_hadamard=False, *, act13_bits=0, act13_format="int", act13_clip=1.0, act2_bits=0,
                     act2_format="int", act2_clip=1.0) -> "ExpertWeights":
        """Inverse of :meth:`op_args` (+ :meth:`act_args` as keywords)."""
        return cls(PackedWeight(w13_qweight, w13_scales, w13_qzeros, w13_bits, w13_group_size),
                   PackedWeight(w2_qweight, w2_scales, w2_qzeros, w2_bits, w2_group_size),
                   activation, online_hadamard, _act_from_flat(act13_bits, act13_format, act13_clip),
                   _act_from_flat(act2_bits, act2_format, act2_clip))

    def dispatch_attrs(self, hidden: torch.Tensor, top_k_index: torch.Tensor, explicit: bool) -> dict:
        """The call attributes the backends' ``supports`` predicates and the dispatch table read.

        Args:
            hidden: ``[T, H]`` activations of the call; top_k_index: ``[T, k]``.
            explicit: the caller named a backend (``backend != "auto"``).
        """
        return {
            "w13_bits": self.w13.bits, "w2_bits": self.w2.bits,
            "w13_group_size": self.w13.group_size, "w2_group_size": self.w2.group_size,
            "hidden_dim": hidden.shape[-1], "intermediate_dim": self.intermediate_dim,
            "num_experts": self.num_experts, "top_k": top_k_index.shape[-1],
            "num_tokens": hidden.shape[0], "zeros": self.has_zeros,
            "online_hadamard": self.online_hadamard, "dtype": hidden.dtype, "activation": self.activation,
            "act13": self.act13, "act2": self.act2,
            # CPU tensors run Triton only through the interpreter, and only when the caller names it: "auto" on
            # a CPU must not send a model's forward into the (slow, bf16-inexact) interpreter.
            "explicit": explicit,
        }


def _flat_act(spec: ActSpec | None) -> tuple[int, str, float]:
    return NO_ACT if spec is None else (spec.bits, spec.format, float(spec.clip))


def _act_from_flat(bits: int, fmt: str, clip: float) -> ActSpec | None:
    return None if bits == 0 else ActSpec(bits, fmt, clip)
