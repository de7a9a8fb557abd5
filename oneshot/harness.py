"""Zero-shot accuracy with EleutherAI's lm-evaluation-harness (the protocol of the SparseGPT / Wanda / OWL papers).

``oneshot eval MODEL --tasks hellaswag,arc_easy`` hands the loaded model to the harness
(``lm_eval.simple_evaluate`` with its ``HFLM`` wrapper) and reports each task's metrics. A task
is a name the harness knows (its datasets come from the hub or the local datasets cache), or the
path of a task YAML file in the harness's own format, which works offline, e.g. a local JSONL
multiple-choice set::

    task: my_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_mc.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: label
    metric_list: [{metric: acc}]

The harness is an optional extra: ``pip install 'oneshot[eval]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from oneshot.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_tasks(entries: list[str]) -> tuple[list[str], list[str], bool]:
    """``(task names, folders to include, whether the harness's own tasks are needed)`` for ``--tasks``.

    An entry that is a ``.yaml`` / ``.yml`` file is a local task: its ``task:`` name is used and its
    folder is included; any other entry must be a task the harness ships.
    """
    import yaml

    names: list[str] = []
    folders: list[str] = []
    builtin = False
    for entry in (e.strip() for e in entries if e.strip()):
        path = Path(entry).expanduser()
        if path.suffix.lower() in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError(f"task file {path} does not exist; pass a task YAML file or a harness task name")
            spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
                raise ConfigError(f"task file {path} has no 'task: NAME' entry (the harness's task YAML format)")
            names.append(spec["task"])
            folders.append(str(path.resolve().parent))
        else:
            names.append(entry)
            builtin = True
    if not names:
        raise ConfigError("--tasks is empty; name harness tasks (e.g. hellaswag,arc_easy) or task YAML files")
    return names, list(dict.fromkeys(folders)), builtin


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 4,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Each task's metrics (``{"arc_easy": {"acc": 0.61, "acc_norm": 0.57}, ...}``) from the harness.

    ``limit`` scores only the first N documents of each task; ``num_fewshot`` examples are
    prepended (0 = zero-shot, the papers' protocol). Standard errors are dropped.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(
            "--tasks runs EleutherAI's lm-evaluation-harness: pip install 'oneshot[eval]' (or lm-eval)"
        ) from exc
    names, folders, builtin = resolve_tasks(tasks)
    manager = TaskManager(include_path=folders or None, include_defaults=builtin, verbosity="ERROR")
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"the harness knows no task {unknown[0]!r}; check the name (`lm-eval ls tasks`) or pass a task YAML file"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        verbosity="ERROR",
    )
    if out is None:  # only non-zero ranks of a distributed run get None
        return {}
    results: dict[str, dict[str, Any]] = out["results"]
    return {
        task: {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and "_stderr" not in key and key != "sample_len"
        }
        for task, metrics in results.items()
    }
