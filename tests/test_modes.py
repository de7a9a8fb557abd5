"""The option x mode table (``docs/modes.md``, from ``oneshot/modes.py``) is current and true."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, saved_tensors

import oneshot
from oneshot.errors import ConfigError
from oneshot.modes import CUDA, GPU_UNCHECKED, MEMORY, MODES, ROWS, STREAMING, TORCHRUN, Row, cell, markdown, refusal

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(4, VOCAB, (8, 24), generator=torch.Generator().manual_seed(5))
STREAMED = [row for row in ROWS if row.tests.get(STREAMING, "").endswith("::test_streaming_equals_in_memory")]


def test_the_table_in_the_docs_is_the_generated_one() -> None:
    assert (ROOT / "docs" / "modes.md").read_text() == markdown(), "run: oneshot modes > docs/modes.md"


def test_every_cell_is_tested_or_refused() -> None:
    """No cell says only "not checked"; a GPU cell with no GPU result says so in words."""
    for row in ROWS:
        for mode in MODES:
            text = cell(row, mode)
            assert text.startswith(("yes (", "refused: ")) or (mode == CUDA and text == GPU_UNCHECKED), (row, mode)


def test_every_test_the_table_names_exists() -> None:
    for row in ROWS:
        for mode, where in row.tests.items():
            path, _, name = where.partition("::")
            assert (ROOT / path).is_file(), (row.option, mode, path)
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), (row.option, where)
            assert refusal(oneshot.PruneConfig(**row.options), mode) is None, (row.option, mode)  # not both


def test_the_refusals_are_the_runs_own() -> None:
    """A refused torchrun cell is what a run over several ranks raises; a refused in-memory cell is the config's."""
    from oneshot.api import _check_distributed

    refused = [(row, mode) for row in ROWS for mode in MODES if cell(row, mode).startswith("refused")]
    assert {mode for _, mode in refused} == {MEMORY, TORCHRUN}
    for row, mode in refused:
        why = refusal(oneshot.PruneConfig(**row.options), mode)
        assert why is not None
        with pytest.raises(ConfigError) as raised:
            if mode == TORCHRUN:
                _check_distributed(oneshot.PruneConfig(**row.options))
            else:
                oneshot.PruneConfig(**row.options, stream=False)
        assert str(raised.value) == why


@pytest.mark.parametrize("row", STREAMED, ids=[row.option for row in STREAMED])
def test_streaming_equals_in_memory(tiny_checkpoint: Callable[[str], Path], tmp_path: Path, row: Row) -> None:
    """Every option the table marks as streamed: the streamed folder is the in-memory one, tensor for tensor."""
    folder = tiny_checkpoint("llama")
    for stream in (False, True):
        oneshot.prune(str(folder), calibration=IDS, out=tmp_path / str(stream), stream=stream, quiet=True,
                      **row.options)  # fmt: skip
    streamed, in_memory = saved_tensors(tmp_path / "True"), saved_tensors(tmp_path / "False")
    assert streamed.keys() == in_memory.keys()
    for key, tensor in in_memory.items():
        assert torch.equal(streamed[key], tensor), key
