"""``quantize_checkpoint``: quantize a checkpoint on disk one decoder layer at a time, every stage in one pass.

The model is a skeleton on the meta device. The embeddings are read only to compute the first layer's
calibration inputs; then for each decoder layer in turn: its weights are read from the source shards
(per-expert hub keys or fused ``gate_up_proj`` / ``down_proj``; block FP8 dequantized; NaN refused -- see
:mod:`moeq.io.source`), every enabled stage acts on it (:mod:`moeq.pipeline.stages`: rotation, smoothing,
router, RTN/GPTQ/AGQ), the calibration activations run through the quantized layer to become the next
layer's inputs, its packed tensors are written as the layer's own shard, and the layer goes back to meta.
The last shard (the embeddings, final norm, lm_head and any other outer tensor) is written after the layers,
streamed: the embeddings are read, written and freed before the head is read, so one vocabulary matrix is in
memory at a time (tied embeddings: the one matrix). Peak host memory is one layer (in the source dtype, plus
the quantizer's temporaries, plus one dense copy of each expert stack while the calibration activations run
through the quantized layer, see :mod:`moeq.nn.dense_cache`) + the calibration activations + the process,
independent of the number of layers (``benchmarks/stream_memory.py`` measures it).

Output: ``model-<i>-of-<L+1>.safetensors`` for layer ``i - 1`` and the last shard for the rest, with the
index, ``config.json`` and the same digests and values as :func:`moeq.save_quantized` writes (format 2). The
run is resumable (:mod:`moeq.pipeline.partial`) and ends in one directory swap (:mod:`moeq.io.atomic`).

For plain RTN, GPTQ and AGQ the packed tensors equal :func:`moeq.quantize_model` + :func:`moeq.save_quantized`
bit for bit (tested), rotation included. Smoothing and KL-aligned 8-bit routers see the activations of the
already quantized earlier layers here (like GPTQ), instead of a separate full-precision pass each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moeq import __version__
from moeq.config import FORMAT_VERSION, QUANT_METHOD, QuantConfig
from moeq.io.atomic import ST_DTYPES, CheckpointTransaction, check_destination, patch_metadata, write_json, \
    write_safetensors, write_safetensors_parts
from moeq.io.checkpoint import INDEX_NAME, _check_finite_scales, checkpoint_tensors, module_entries, \
    quantization_config_from
from moeq.io.integrity import META_CONFIG, META_DATA, META_LAYOUT, canonical_sha256, layout_sha256
from moeq.io.load import assign_tensor, params_on_meta
from moeq.io.source import SourceCheckpoint, open_source
from moeq.memory import release_freed_memory
from moeq.models import MoEAdapter, adapter_for
from moeq.pipeline.activations import DiskActivations
from moeq.pipeline.partial import PartialRun, source_digest, tensor_digest
from moeq.pipeline.stages import LayerContext, Stage, merge_calibration, stages_for
from moeq.quantize import check_module_names
from moeq.quantizers.report import ModuleReport, QuantReport
from moeq.runner import capture_inputs, iter_layer, run_layer
from moeq.smoothing import calib_tensors

logger = logging.getLogger(__name__)

_PLACEHOLDER = "0" * 64  # a digest not known until the last layer is done (patched in place, same length)


def quantize_checkpoint(source: str | Path, out: str | Path, config: QuantConfig | None = None, calib=None, *,
                        dtype: torch.dtype | None = None, device=None, tokenizer=None, overwrite: bool = False,
                        restart: bool = False, calib_source: str | None = None, offload_dir: str | Path | None = None,
                        hessian_mib: int | None = None,
                        on_layer: Callable[[int], None] | None = None,
                        on_step: Callable[[str], None] | None = None) -> tuple[Path, QuantReport]:
    """Quantize the full-precision checkpoint ``source`` into the moeq checkpoint ``out``, layer by layer.

    Args:
        config: what to do (:class:`QuantConfig`; mixed-precision plans must already be in ``expert_bits``).
        calib: calibration tokens, int64 ``[n, L]`` or a dict with ``input_ids`` / ``attention_mask`` ``[n, L]``
            (needed by gptq/agq, smoothing and KL-aligned routers).
        dtype: dtype the weights are read in (default: the config's).
        device: compute device; each layer streams host -> device, so device memory is one layer plus the
            calibration activations.
        tokenizer: saved beside the checkpoint when given.
        overwrite: replace an existing moeq checkpoint at ``out``.
        restart: discard an unfinished run of other settings (by default it is continued when the settings
            match and refused otherwise).
        calib_source: recorded as ``calibration._samples.source``.
        offload_dir: keep the calibration activations between layers in files under this directory (one per
            sample, :class:`~moeq.pipeline.activations.DiskActivations`) instead of memory, and so are the
            experts' inputs GPTQ/AGQ record for chunked Hessians (``hessian_mib``); same results.
        hessian_mib: GPTQ/AGQ collect the experts' Hessians in chunks of experts of about this many MiB
            (default 128, :data:`moeq.quantizers.gptq_layer.HESSIAN_BYTES`): the first calibration pass over a
            layer records the experts' inputs and later chunks replay them; same results whatever the size.
        on_layer: called with each layer index once the layer is recorded (tests interrupt from it).
        on_step: the final save's fault-injection hook (:class:`moeq.io.atomic.CheckpointTransaction`).
    Returns:
        ``(out directory, report)``.
    """
    config = config or QuantConfig()
    src = Path(source)
    dest = check_destination(out, [src], overwrite)
    sc, plan_model = open_source(src, dtype)
    model = _skeleton(sc, next(plan_model.parameters()).dtype)
    reader = _Reader(sc, plan_model)
    adapter = adapter_for(model)
    adapter.check(model)
    check_module_names(model, adapter, config)
    if hessian_mib is not None and hessian_mib < 1:
        raise ValueError(f"hessian_mib must be >= 1, got {hessian_mib}")
    stages = stages_for(config, model.config.hidden_size, calib is not None,
                        None if hessian_mib is None else hessian_mib << 20)
    ids, mask = calib_tensors(calib) if calib is not None else (None, None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    run = PartialRun(dest, _fingerprint(sc, config, ids, mask, model, device), restart)
    layers = adapter.layers(model)
    names = [f"model-{i + 1:05d}-of-{len(layers) + 1:05d}.safetensors" for i in range(len(layers) + 1)]
    report = QuantReport()
    for i in sorted(run.layers):
        report.modules += [ModuleReport(**{**d, "shape": tuple(d["shape"])}) for d in run.layers[i]["report"]]
    start = run.next_layer
    needs_inputs = any(s.needs_inputs for s in stages)
    acts = None if offload_dir is None else Path(offload_dir) / f"{dest.name}.moeq-inputs"
    inputs = _first_inputs(reader, model, adapter, stages, run, start, ids, mask, device, acts) \
        if needs_inputs and start < len(layers) else None
    store = torch.device("cpu") if device.type == "cpu" or acts is not None else device
    with tqdm(total=len(layers), initial=start, desc=f"{config.method}: layers", unit="layer") as bar:
        for i in range(start, len(layers)):
            times = _quantize_layer(reader, model, adapter, config, stages, run, i, names[i], inputs, device, store, report,
                                    acts)
            bar.set_postfix_str(" ".join(f"{k} {v:.1f}s" for k, v in times.items()))
            bar.update(1)
            if on_layer is not None:
                on_layer(i)
    return _finish(reader, model, adapter, config, stages, run, names, ids, mask, calib_source, tokenizer, dest,
                   on_step), report


def _skeleton(sc: SourceCheckpoint, dtype: torch.dtype) -> nn.Module:
    """The CausalLM with parameters on meta and computed buffers (rotary ``inv_freq``) real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(sc.path)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def _fingerprint(sc: SourceCheckpoint, config: QuantConfig, ids, mask, model: nn.Module, device) -> dict:
    """What determines the output bytes (a resumed run must match it)."""
    return {"source": source_digest(sc.path, sc.tensors), "config": config.to_dict(),
            "calibration": None if ids is None else tensor_digest(ids, mask),
            "dtype": str(next(model.parameters()).dtype), "device": device.type, "threads": torch.get_num_threads(),
            "moeq": __version__, "torch": torch.__version__}


def _outer_names(model: nn.Module, adapter: MoEAdapter) -> list[str]:
    """Module names holding the non-layer tensors (embeddings, final norm, lm_head, ...)."""
    lead = adapter.layers_path + "."
    return sorted({k.rpartition(".")[0] for k in model.state_dict() if not k.startswith(lead)})


@dataclasses.dataclass
class _Reader:
    """The source checkpoint and the pristine meta model its names are mapped on: the skeleton changes as its
    layers are quantized, the plan model does not, so the source plan is built once."""

    sc: SourceCheckpoint
    plan_model: nn.Module

    def load(self, model: nn.Module, names: list[str]) -> None:
        """Read the tensors of modules ``names`` into ``model``."""
        for name in names:
            for key, t in self.sc.load_module(name, self.plan_model).items():
                assign_tensor(model, key, t)


def _first_inputs(reader: _Reader, model, adapter, stages: list[Stage], run: PartialRun, start: int, ids, mask, device,
                  acts: Path | None):
    """Calibration inputs of layer ``start``: the embeddings' outputs (layer 0) or the saved ones (in memory,
    or a :class:`DiskActivations` under ``acts``)."""
    store = torch.device("cpu") if device.type == "cpu" or acts is not None else device
    reader.load(model, [adapter.embed_path])
    for s in stages:
        s.outer(model, adapter, "embed")
    sink = None if acts is None or start > 0 else DiskActivations(acts / f"inputs-{start:05d}")
    # the embeddings' outputs, and also the per-sample layer kwargs (position embeddings, masks)
    inputs = capture_inputs(model, adapter, ids, mask, device, store, hidden=sink)
    model.get_submodule(adapter.embed_path).to("meta")  # read again at the end, when it is written
    if start > 0:
        saved = run.load_inputs(start)
        inputs.hidden = saved if isinstance(saved, DiskActivations) else [h.to(store) for h in saved]
    return inputs


def _quantize_layer(reader: _Reader, model, adapter, config, stages, run, i, shard, inputs, device, store, report,
                    acts: Path | None) -> dict:
    """Read, process, write and free layer ``i``; returns seconds per stage."""
    prefix = f"{adapter.layers_path}.{i}"
    t0 = time.perf_counter()
    reader.load(model, [prefix])
    layers = adapter.layers(model)
    times = {"read": time.perf_counter() - t0}
    ctx = LayerContext(i, layers[i].to(device), adapter, config, inputs, device, QuantReport(), scratch=acts)
    for s in stages:
        t0 = time.perf_counter()
        s.run(ctx)
        times[s.name] = times.get(s.name, 0.0) + time.perf_counter() - t0
    next_inputs = None
    previous = None if inputs is None else inputs.hidden
    if inputs is not None and i + 1 < len(layers):
        t0 = time.perf_counter()
        if acts is None:
            next_inputs = run_layer(ctx.layer, inputs, device, store)
        else:  # one sample in memory at a time
            next_inputs = DiskActivations(acts / f"inputs-{i + 1:05d}")
            for y in iter_layer(ctx.layer, inputs, device):
                next_inputs.append(y)
        inputs.hidden = next_inputs
        times["propagate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tensors = {k: v.detach().cpu() for k, v in checkpoint_tensors(model, prefix).items()}
    _check_finite_scales(tensors)
    write_safetensors(run.dir / shard, tensors, _shard_meta(_PLACEHOLDER, _PLACEHOLDER), digest_key=META_DATA)
    modules, linears = module_entries(model, adapter, prefix + ".")
    record = {"shard": shard, "tensors": {k: [ST_DTYPES[t.dtype], list(t.shape)] for k, t in tensors.items()},
              "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "modules": modules,
              "linear_modules": linears, "calibration": ctx.calibration,
              "report": [dataclasses.asdict(m) for m in ctx.report.modules]}
    run.finish_layer(i, record, next_inputs)
    if isinstance(previous, DiskActivations) and previous is not next_inputs:
        previous.remove()  # recorded: this layer's inputs are no longer needed
    layers[i].to("meta")  # frees the layer: its quantized module structure stays for the config
    times["write"] = time.perf_counter() - t0
    report.modules += ctx.report.modules
    del ctx, previous, tensors
    release_freed_memory()  # the next layer reuses none of this layer's heap fragments otherwise
    return times


def _shard_meta(config_digest: str, layout_digest: str) -> dict[str, str]:
    return {"format": "pt", "quant_method": QUANT_METHOD, "moeq_format_version": str(FORMAT_VERSION),
            META_CONFIG: config_digest, META_LAYOUT: layout_digest}


def _finish(reader: _Reader, model, adapter, config, stages, run: PartialRun, names, ids, mask, calib_source, tokenizer, dest,
            on_step) -> Path:
    """Write the non-layer shard, the config and the index, patch the digests in, and swap into place."""
    modules, linears, calibration, layout, sizes = {}, {}, {}, {}, {}
    for i in sorted(run.layers):
        rec = run.layers[i]
        modules.update(rec["modules"])
        linears.update(rec["linear_modules"])
        merge_calibration(calibration, rec["calibration"])
        layout.update({k: (d, tuple(s)) for k, (d, s) in rec["tensors"].items()})
        sizes[rec["shard"]] = (list(rec["tensors"]), rec["bytes"])
    if ids is not None and (config.method != "rtn" or calibration):  # as quantize_model records it
        calibration["_samples"] = {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                                   "tokens": int(ids.numel() if mask is None else mask.sum())}
        if calib_source is not None:
            calibration["_samples"]["source"] = calib_source
    rest, parts = _outer_parts(reader, model, adapter, stages)
    layout.update({k: (ST_DTYPES[d], tuple(s)) for k, (d, s) in rest.items()})
    sizes[names[-1]] = (list(rest), sum(math.prod(s) * d.itemsize for d, s in rest.values()))
    with CheckpointTransaction(dest, on_step, workdir=run.dir) as tx:
        tx.step("rest")  # first: the stages' outer hooks run as it is written (rotation may untie lm_head)
        write_safetensors_parts(tx.dir / names[-1], rest, parts, _shard_meta(_PLACEHOLDER, _PLACEHOLDER),
                                digest_key=META_DATA)
        tx.step("config")
        model.config.quantization_config = quantization_config_from(config, modules, linears, calibration)
        model.config.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        model.config.save_pretrained(tx.dir)
        written = json.loads((tx.dir / "config.json").read_text())["quantization_config"]
        digests = {META_CONFIG: canonical_sha256(written), META_LAYOUT: layout_sha256(layout)}
        for name in names:
            tx.step(f"patch:{name}")
            patch_metadata(tx.dir / name, digests)
        tx.step("index")
        write_json(tx.dir / INDEX_NAME, {"metadata": {"total_size": sum(b for _, b in sizes.values())},
                                         "weight_map": {k: f for f, (keys, _) in sizes.items() for k in keys}})
        tx.step("side_files")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tx.dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tx.dir)
        run.clean()
    logger.info("saved %d tensors in %d shard(s) to %s", len(layout), len(names), dest)
    return dest


def _outer_parts(reader: _Reader, model, adapter, stages: list[Stage]):
    """The non-layer tensors as ``(layout: name -> (dtype, shape), parts)``: ``parts`` yields them one group
    of modules at a time (the embeddings, then the final norm + lm_head + the rest), each group read, passed
    through the stages' outer hooks, and sent back to meta before the next is read, so only one of the two
    vocabulary-sized matrices is in memory. Tied embeddings are one matrix: one group, read up front (the
    hooks decide whether lm_head stays tied, so the layout is known only then)."""
    outer = _outer_names(reader.plan_model, adapter)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors = _outer_group(reader, model, adapter, stages, outer, outer, ("embed", "head"))
        return {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, iter([tensors])
    lead = adapter.layers_path + "."
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in model.state_dict().items() if not k.startswith(lead)}
    groups = [([adapter.embed_path], ("embed",)), ([n for n in outer if n != adapter.embed_path], ("head",))]

    def parts():
        for group, hooks in groups:
            tensors = _outer_group(reader, model, adapter, stages, outer, group, hooks)
            yield tensors
            del tensors
            for name in group:
                model.get_submodule(name).to("meta")
            release_freed_memory()

    return layout, parts()


def _outer_group(reader: _Reader, model, adapter, stages: list[Stage], outer: list[str], group: list[str],
                 hooks) -> dict:
    """Read modules ``group`` (of the non-layer modules ``outer``) into ``model``, run the stages' outer
    ``hooks`` parts, return their tensors (a tied copy once)."""
    reader.load(model, group)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for s in stages:
        for part in hooks:
            s.outer(model, adapter, part)
    skip = (adapter.layers_path, *(n for n in outer if n not in group))
    return {k: v.detach().cpu() for k, v in checkpoint_tensors(model, skip=skip).items()}
