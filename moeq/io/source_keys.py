"""Map a source checkpoint's tensor names onto a transformers v5 model's state-dict names.

Two layouts reach moeq as ``--model``:

* hub / ``save_pretrained`` layout: every routed expert stored on its own,
  ``<layers>.<i>.<mlp>.experts.<e>.{gate,up,down}_proj.weight`` (Mixtral: ``block_sparse_moe.experts.<e>.w1/w3/w2``).
  transformers v5's ``save_pretrained`` writes this layout too (it reverses its load-time conversion).
* fused layout (the v5 module names as they are): ``<experts>.gate_up_proj [E, 2I, H]`` and ``<experts>.down_proj
  [E, H, I]``.

The rules follow what transformers' ``conversion_mapping`` does for these families (a substring rename, then
per-expert ``gate``/``up`` stacked along dim 0 and concatenated along dim 1, gate rows first), written from
the adapter's ``hub_renames`` / ``hub_expert_proj`` so the table lives in one place (``moeq/models/families.py``)
and does not depend on transformers internals that changed between 5.17 and 5.24.

A *plan* maps each model tensor name to the :class:`Part` s that fill it; names the model does not have are
``unexpected``; the adapter-independent companions of FP8 weights (``<weight>_scale_inv``) are handled by the
reader, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moeq.models import MoEAdapter

SCALE_SUFFIX = "_scale_inv"
# FP8 static-activation checkpoints carry per-linear activation scales; moeq dequantizes weights only and
# calibrates its own activations, so these are read past (never an "unexpected tensor").
FP8_AUX_SUFFIXES = (".input_scale", ".activation_scale")
# Checkpoints written by transformers v4 (and older hub uploads) store rotary caches that v5 computes itself.
ALWAYS_IGNORED = (re.compile(r"\.rotary_emb\.inv_freq$"),)
_GENERIC_EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
_EXPERT_KEY = re.compile(r"^(?P<mod>.+)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.weight$")


@dataclass(frozen=True)
class Part:
    """One source tensor and where it lands in a model tensor.

    Attributes:
        key: source tensor name.
        expert: index along dim 0 of the model tensor (fused experts), or None for the whole tensor.
        rows: ``(start, stop)`` rows of that expert's slice (gate / up halves of ``gate_up_proj``), or None.
    """

    key: str
    expert: int | None = None
    rows: tuple[int, int] | None = None


@dataclass
class Plan:
    """Where every model tensor comes from.

    Attributes:
        parts: model name -> parts (one whole-tensor part, or E / 2E per-expert parts of a fused tensor).
        unexpected: source names that map to no model tensor.
        conflicts: model names filled both from a fused tensor and from per-expert tensors.
        expected_parts: fused model name -> the per-expert source names that would fill it completely
            (hub names, so a missing one is reported the way it is spelled in the checkpoint).
    """

    parts: dict[str, list[Part]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    expected_parts: dict[str, list[str]] = field(default_factory=dict)


def to_model_name(key: str, adapter: MoEAdapter) -> str:
    """The v5 module-name spelling of a source name (undoes the family's ``hub_renames``)."""
    for v5, hub in adapter.hub_renames:
        key = key.replace(hub, v5)
    return key


def fused_experts(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int, int]]:
    """Experts modules of the model: module name -> ``(E, I, H)``, from 3-D ``gate_up_proj [E, 2I, H]`` and
    ``down_proj [E, H, I]`` pairs in its state dict."""
    out = {}
    for name, shape in shapes.items():
        if not name.endswith(".gate_up_proj") or len(shape) != 3:
            continue
        mod = name[: -len(".gate_up_proj")]
        down = shapes.get(mod + ".down_proj")
        if down is not None and len(down) == 3 and 2 * down[2] == shape[1]:
            out[mod] = (shape[0], down[2], shape[2])
    return out


def _expert_part(name: str, experts: dict[str, tuple[int, int, int]], adapter: MoEAdapter):
    """``(model name, Part with source key unset)`` when ``name`` is a per-expert weight of a fused module."""
    m = _EXPERT_KEY.match(name)
    if m is None or m["mod"] not in experts:
        return None
    n_exp, inter, _ = experts[m["mod"]]
    e, proj = int(m["e"]), m["proj"]
    if e >= n_exp:
        return None
    for names in (adapter.hub_expert_proj, _GENERIC_EXPERT_PROJ):
        if proj == names[0]:
            return m["mod"] + ".gate_up_proj", e, (0, inter)
        if proj == names[1]:
            return m["mod"] + ".gate_up_proj", e, (inter, 2 * inter)
        if proj == names[2]:
            return m["mod"] + ".down_proj", e, None
    return None


def hub_expert_keys(mod: str, n_exp: int, adapter: MoEAdapter) -> dict[str, list[str]]:
    """Hub-layout source names of one fused experts module: ``gate_up_proj`` -> gate and up names of every
    expert (gate first), ``down_proj`` -> down names."""
    gate, up, down = adapter.hub_expert_proj
    hub = adapter.hub_name(mod)
    return {
        mod + ".gate_up_proj": [f"{hub}.{e}.{p}.weight" for e in range(n_exp) for p in (gate, up)],
        mod + ".down_proj": [f"{hub}.{e}.{down}.weight" for e in range(n_exp)],
    }


def build_plan(source_keys, shapes: dict[str, tuple[int, ...]], adapter: MoEAdapter,
               ignore: tuple[re.Pattern, ...] = ()) -> Plan:
    """Map ``source_keys`` (companion FP8 scales excluded by the caller) onto the model names in ``shapes``.

    Args:
        source_keys: tensor names stored in the checkpoint.
        shapes: the model's state-dict names -> shapes (parameters and persistent buffers).
        adapter: the family's adapter (hub renames and per-expert projection names).
        ignore: patterns of source names the model class tells transformers to ignore when unexpected
            (``_keys_to_ignore_on_load_unexpected``, e.g. DeepSeek-V3's MTP layer 61).
    """
    experts = fused_experts(shapes)
    plan = Plan()
    for mod, (n_exp, _, _) in experts.items():
        plan.expected_parts.update(hub_expert_keys(mod, n_exp, adapter))
    for key in source_keys:
        name = to_model_name(key, adapter)
        if name in shapes:
            plan.parts.setdefault(name, []).append(Part(key))
            continue
        hit = _expert_part(name, experts, adapter)
        if hit is not None:
            target, e, rows = hit
            plan.parts.setdefault(target, []).append(Part(key, e, rows))
        elif not any(p.search(key) for p in ALWAYS_IGNORED + tuple(ignore)):
            plan.unexpected.append(key)
    for name, parts in plan.parts.items():
        whole = [p for p in parts if p.expert is None]
        slots = {(p.expert, p.rows) for p in parts}
        # a fused tensor and per-expert tensors for the same weight, or one expert slice stored twice (e.g.
        # Mixtral's w1 and gate_proj): which one transformers would keep is an accident of key order
        if (whole and len(parts) > 1) or len(slots) != len(parts):
            plan.conflicts.append(name)
    return plan


def missing_parts(plan: Plan, name: str) -> list[str]:
    """Source names still needed to fill model tensor ``name`` completely (empty when it is complete)."""
    parts = plan.parts.get(name, [])
    if any(p.expert is None for p in parts):
        return []
    expected = plan.expected_parts.get(name)
    if expected is None:
        return [] if parts else [name]
    got = {(p.expert, None if p.rows is None else p.rows[0] == 0) for p in parts}
    gate_up = name.endswith(".gate_up_proj")
    out = []
    for i, key in enumerate(expected):
        # gate_up names alternate gate, up per expert; True marks the gate half (rows starting at 0)
        want = (i // 2, i % 2 == 0) if gate_up else (i, None)
        if want not in got:
            out.append(key)
    if len(out) == len(expected):
        return [name]  # nothing of it at all: name the model tensor (fused spelling) as transformers does
    return out
