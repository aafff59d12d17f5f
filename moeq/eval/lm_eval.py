"""Optional lm-evaluation-harness run on a model instance (quantized or not).

``lm_eval`` is not a dependency of moeq: importing this module never fails; calling :func:`run_lm_eval`
without it installed raises :class:`LMEvalNotInstalled` with the install command. Tasks may be local
(``include_path`` = a directory of task YAMLs), so the run can stay offline.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install lm-eval"


class LMEvalNotInstalled(ImportError):
    """lm-evaluation-harness (the ``lm_eval`` package) is not installed."""


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise LMEvalNotInstalled(
            f"lm-evaluation-harness is not installed ({exc}); install it with `{INSTALL_HINT}` to run lm-eval tasks"
        ) from exc
    return lm_eval, HFLM


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], batch_size: int = 1, limit: float | None = None,
                num_fewshot: int | None = None, include_path: str | None = None) -> dict:
    """Evaluate ``model`` (an in-memory causal LM, e.g. from ``moeq.load_quantized``) on lm-eval ``tasks``.

    Wraps the instance in lm-eval's ``HFLM`` (no re-loading, so quantized modules are kept) and returns the
    harness's ``results`` dict (task -> metric -> value). ``include_path`` adds a directory of local task
    YAMLs; ``limit`` caps examples per task. Raises :class:`LMEvalNotInstalled` without ``lm_eval``.
    """
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    lm_eval, HFLM = _import_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    task_manager = lm_eval.tasks.TaskManager(include_path=include_path) if include_path else None
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  task_manager=task_manager)
    logger.info("lm-eval finished: %s", ", ".join(tasks))
    return out["results"]


def format_results(results: dict) -> list[str]:
    """One line per task and numeric metric of :func:`run_lm_eval`'s results."""
    lines = []
    for task, metrics in sorted(results.items()):
        for name, value in sorted(metrics.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"{task}: {name} {value:.4f}")
    return lines
