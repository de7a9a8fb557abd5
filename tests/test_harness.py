"""`oneshot eval --tasks`: lm-evaluation-harness on a local multiple-choice file, checked against a hand count."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from oneshot.cli import main
from oneshot.errors import ConfigError
from tests.conftest import char_tokenizer

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Two plus two is", "choices": ["three", "four"], "label": 1},
    {"question": "Cats say", "choices": ["woof", "meow", "moo"], "label": 1},
    {"question": "Ice is", "choices": ["cold", "hot"], "label": 0},
    {"question": "The sun rises in the", "choices": ["west", "east", "north"], "label": 1},
    {"question": "Fish live in", "choices": ["trees", "water"], "label": 1},
    {"question": "Snow is", "choices": ["white", "black", "red"], "label": 0},
    {"question": "A week has seven", "choices": ["days", "hours"], "label": 0},
]


def _task(folder: Path) -> Path:
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    spec = folder / "tiny_mc.yaml"
    spec.write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    return spec


def _hand_count(model: nn.Module, tokenizer: object) -> float:
    """Accuracy by hand: the choice whose tokens (after the question and a space) get the largest summed log-prob."""
    right = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0]  # [T-1, vocab]
            targets = whole[len(context) :]
            positions = range(len(context) - 1, len(whole) - 1)
            scores.append(sum(float(logprobs[p, t]) for p, t in zip(positions, targets, strict=True)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(DOCS)


def test_tasks_accuracy_equals_a_hand_count(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    from oneshot.loading import load_model

    folder = tiny_checkpoint("llama")
    spec = _task(tmp_path)
    result = CliRunner().invoke(main, ["eval", str(folder), "--tasks", str(spec), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    model, tokenizer = load_model(folder)
    want = _hand_count(model.eval(), tokenizer)
    assert found["results"]["tiny_mc"]["acc"] == pytest.approx(want)
    assert 0 < want < 1  # a random model: some right, some wrong, so the count pins the harness's choices
    limited = CliRunner().invoke(main, ["eval", str(folder), "--tasks", str(spec), "--limit", "4", "--json", "--quiet"])
    got = json.loads(limited.stdout)["results"]["tiny_mc"]["acc"]
    assert got * 4 == pytest.approx(round(got * 4))  # a share of 4 documents


def test_task_arguments_are_checked(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    from oneshot.harness import evaluate_tasks, resolve_tasks

    folder = tiny_checkpoint("llama")
    result = CliRunner().invoke(main, ["eval", str(folder)])
    assert result.exit_code != 0 and "--data FILE for perplexity or --tasks" in result.output
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_tasks([str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match="no 'task: NAME'"):
        resolve_tasks([str(bad)])
    assert resolve_tasks(["hellaswag", str(_task(tmp_path))]) == (["hellaswag", "tiny_mc"], [str(tmp_path)], True)
    with pytest.raises(ConfigError, match="no task 'not_a_task'"):
        evaluate_tasks(nn.Linear(1, 1), char_tokenizer(), ["not_a_task", str(_task(tmp_path))])
