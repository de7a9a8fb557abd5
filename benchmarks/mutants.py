"""One-token mutants of the code a change touched, each run against the fast tests that should kill it.

A mutant that survives is a missing test or dead code. Two sources of mutants: the explicit list
below (file, original, mutant), and ``--auto FILE,...``, which makes every one-token change of a
fixed set (arithmetic and comparison operators, ``and``/``or``, ``True``/``False``, integer and
float constants, ``dim`` arguments, reductions such as ``sum``/``mean``, ``max``/``min``, and dropping
``.sqrt()`` / ``.abs()`` / ``.square()`` / ``not``) on the code lines of those files (strings,
comments and docstrings are left alone). Each file is restored after its mutant runs. Run it in a
separate clone: the files are rewritten while it runs.

    .venv/bin/python -m benchmarks.mutants --tests tests/test_shards.py,tests/test_streaming.py
    .venv/bin/python -m benchmarks.mutants --auto oneshot/methods/wanda.py --tests tests/test_methods.py
    .venv/bin/python -m benchmarks.mutants --auto oneshot/methods/gptq.py --changed-since HEAD~3 --tests ...
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (file, original text, mutated text): each original must occur exactly once in its file.
MUTANTS: list[tuple[str, str, str]] = [
    ("oneshot/shards.py", "if self.entries and self.end + data.nbytes > self.max_shard_bytes:",
     "if self.entries and self.end + data.nbytes >= self.max_shard_bytes * 2:"),
    ("oneshot/shards.py", 'f.truncate(8 + self.room + self.end)', 'f.truncate(8 + self.room + self.end + 8)'),
    ("oneshot/shards.py", 'with self._current.open("r+b" if self.entries else "wb") as f:',
     'with self._current.open("r+b" if self._current.exists() else "wb") as f:'),
    ("oneshot/shards.py", "self.end += data.nbytes", "self.end = data.nbytes"),
    ("oneshot/shards.py", "if saved.digest() != expected[saved.key]:", "if False:"),
    ("oneshot/shards.py", 'name = SINGLE_FILE if total == 1 else', 'name = SINGLE_FILE if total == 0 else'),
    ("oneshot/activations.py", "self._write(self.current, batch, host)", "self._write(1 - self.current, batch, host)"),
    ("oneshot/activations.py", "        self.current = target\n", "        self.current = self.current\n"),
    ("oneshot/activations.py", "self._keep = self._budget is not None and 2 * total <= self._budget",
     "self._keep = self._budget is not None"),
    ("oneshot/activations.py", "self._pending = (target, self._kept)", "self._pending = (1 - target, self._kept)"),
    ("oneshot/activations.py", "        kept = self._kept.get(batch)\n", "        kept = None\n"),
    ("oneshot/activations.py", "                _fsync(self._path(file))\n", "                pass\n"),
    ("oneshot/streaming.py", "self._submit(job)  # the next block", "job()  # the next block"),
    ("oneshot/streaming.py", "            else:  # the next block writes into the file the last record",
     "            elif False:  # the next block writes into the file the last record"),
    ("oneshot/streaming.py", "self.save_progress(store_state)", "self.save_progress()"),
    ("oneshot/streaming.py", "        self.wait()  # the last block, written behind the sweep\n", "        pass\n"),
    ("oneshot/streaming.py", "self._activation_budget = (config.max_memory or default_budget()) // 2",
     "self._activation_budget = (config.max_memory or default_budget()) * 2"),
    ("oneshot/activations.py", "return sum(math.prod(s) for s in self.shapes[:batch]) * self._itemsize",
     "return sum(math.prod(s) for s in self.shapes[: batch + 1]) * self._itemsize"),
    ("oneshot/streaming.py", 'update: dict[str, Any] = {"next_block": index + 1}',
     'update: dict[str, Any] = {"next_block": index}'),
    ("oneshot/config.py", 'RUN_ONLY = ("quiet", "resume", "device", "stream", "max_memory")',
     'RUN_ONLY = ("quiet", "resume", "device", "stream", "max_memory", "sparsity")'),
    ("oneshot/streaming.py", "if not name.startswith(inside) and id(param) not in skip and name in self.keys",
     "if id(param) not in skip and name in self.keys"),
    ("oneshot/streaming.py", "value.to(self._param_dtype[name]) if name is not None else value", "value"),
    ("oneshot/streaming.py", "h.update(calib.attention_mask.to(torch.int64).numpy().tobytes())", "pass"),
    ("oneshot/engine.py", "sink = store.put if io.start == 0 else (lambda b, h: None)", "sink = store.put"),
    ("oneshot/checkpoint.py", "if path.stat().st_size < 8 + size + end:", "if path.stat().st_size < 8 + size:"),
    ("oneshot/checkpoint.py", 'f"{prefix}.{name}", name.removeprefix(f"{prefix}.")] if prefix else [name]',
     'f"{prefix}.{name}"] if prefix else [name]'),
    ("oneshot/writer.py", "if tuple(tensor.shape) != saved.shape or not _same_bytes(tensor, saved):", "if False:"),
    ("oneshot/writer.py", "missing = [k for k, t in state.items() if t.data_ptr() not in saved_ptrs and t.numel() > 0]",
     "missing = []"),
    ("oneshot/methods/sparsegpt.py", "system = p.unsqueeze(2) * p.unsqueeze(1) * u1 + (1 - p).unsqueeze(2) * eye",
     "system = p.unsqueeze(2) * u1 + (1 - p).unsqueeze(2) * eye"),
    ("oneshot/methods/sparsegpt.py", "q1 = (w1 - err @ u1) * keep1", "q1 = w1 * keep1"),
    ("oneshot/methods/sparsegpt.py", "losses += err1.square().sum(dim=1) / 2", "losses += err1.abs().sum(dim=1) / 2"),
    ("oneshot/methods/linalg.py", "damped.diagonal().add_(rel * mean_diag)", "damped.diagonal().add_(rel)"),
    ("oneshot/methods/masks.py", "rows = max(1, SORT_CHUNK // max(1, scores[0].numel()))", "rows = 1"),
    ("oneshot/memory.py", "return int(peak if sys.platform == \"darwin\" else peak * 1024)", "return int(peak)"),
]  # fmt: skip


#: One-token replacements of --auto: operator / name -> its alternatives.
SWAPS: dict[str, tuple[str, ...]] = {
    "+": ("-",), "-": ("+",), "*": ("/",), "/": ("*",), "**": ("*",), "//": ("/",),
    "<": ("<=",), "<=": ("<",), ">": (">=",), ">=": (">",), "==": ("!=",), "!=": ("==",),
    "and": ("or",), "or": ("and",), "True": ("False",), "False": ("True",),
    "sum": ("mean",), "mean": ("sum",), "max": ("min",), "min": ("max",), "amax": ("amin",), "amin": ("amax",),
    "sqrt": ("rsqrt",), "float32": ("bfloat16",), "float64": ("float32",),
}  # fmt: skip
#: Calls dropped by --auto: ``x.sqrt()`` -> ``x``.
DROPPED = ("sqrt", "abs", "square", "clone", "detach")


def auto_mutants(file: str) -> list[tuple[str, int, str, str]]:
    """Every one-token mutant of ``file``'s code: (file, line number, original line, mutated line)."""
    text = (ROOT / file).read_text()
    lines = text.splitlines(keepends=True)
    out: list[tuple[str, int, str, str]] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for i, tok in enumerate(tokens):
        (row, col), (end_row, end) = tok.start, tok.end
        if row > len(lines) or end_row != row:
            continue
        line = lines[row - 1]
        if line.lstrip().startswith(("log.", "raise ", "assert ", "def ", "class ", "@", "from ", "import ")):
            continue
        new: list[str] = []
        prev = tokens[i - 1].string if i else ""
        if tok.string in ("*", "**", "-") and prev in ("(", ",", "=", "[", ":"):  # unary: a star-arg, a sign
            continue
        swap = tok.type == tokenize.OP or prev == "." or tok.string in ("and", "or", "True", "False")
        if tok.type in (tokenize.OP, tokenize.NAME) and tok.string in SWAPS and swap:
            new = [line[:col] + alt + line[end:] for alt in SWAPS[tok.string]]
        if tok.type == tokenize.NAME and tok.string in DROPPED and i and tokens[i - 1].string == ".":
            after = line[end:]
            if after.startswith("()"):
                new.append(line[: col - 1] + after[2:])
        if tok.type == tokenize.NAME and tok.string == "not":
            new.append(line[:col] + line[end:].lstrip())
        if tok.type == tokenize.NUMBER:
            value = tok.string
            alt = (
                str(int(value) + 1)
                if value.isdigit()
                else (f"{float(value) * 2!r}" if re.fullmatch(r"[0-9.e+-]+", value) else None)
            )
            if alt is not None:
                new.append(line[:col] + alt + line[end:])
        out += [(file, row, line, m) for m in new if m != line]
    return out  # fmt: skip


def _pytest(tests: list[str]) -> bool:
    """Whether the tests fail (the mutant is killed)."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", *tests],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return res.returncode != 0


def changed_lines(file: str, since: str) -> set[int]:
    """Line numbers of ``file`` (as it is now) added or changed since the git revision ``since``."""
    diff = subprocess.run(
        ["git", "diff", "-U0", since, "--", file], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    rows: set[int] = set()
    for start, count in re.findall(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", diff, flags=re.M):
        first = int(start)
        rows.update(range(first, first + (1 if count == "" else int(count))))
    return rows


def run_auto(
    files: list[str], tests: list[str], start: int = 0, since: str | None = None
) -> list[tuple[str, str, bool]]:
    """Apply each --auto mutant of ``files`` in turn, run ``tests``; returns (file:line, mutant, killed).

    ``start`` skips the first mutants that compile (to continue a run that was stopped); with
    ``since`` (a git revision) only the lines changed since it are mutated.
    """
    results = []
    seen = 0
    for file in files:
        path = ROOT / file
        text = path.read_text()
        lines = text.splitlines(keepends=True)
        wanted = None if since is None else changed_lines(file, since)
        for _, row, _original, mutant in auto_mutants(file):
            if wanted is not None and row not in wanted:
                continue
            mutated = "".join(lines[: row - 1] + [mutant] + lines[row:])
            try:
                compile(mutated, file, "exec")
            except SyntaxError:
                continue
            seen += 1
            if seen <= start:
                continue
            path.write_text(mutated)
            try:
                killed = _pytest(tests)
            finally:
                path.write_text(text)
            results.append((f"{file}:{row}", mutant.strip(), killed))
            print(f"{'killed  ' if killed else 'SURVIVED'} {file}:{row}: {mutant.strip()}", flush=True)
    return results


def run(tests: list[str]) -> list[tuple[str, str, bool]]:
    """Apply each mutant, run ``tests``; returns (file, mutant, killed)."""
    results = []
    for file, original, mutant in MUTANTS:
        path = ROOT / file
        text = path.read_text()
        if text.count(original) != 1:
            raise SystemExit(f"{file}: the original of mutant {mutant!r} occurs {text.count(original)} times")
        path.write_text(text.replace(original, mutant))
        try:
            res = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", *tests],
                cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
        finally:
            path.write_text(text)
        killed = res.returncode != 0
        results.append((file, mutant, killed))
        print(f"{'killed  ' if killed else 'SURVIVED'} {file}: {mutant}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tests",
        default="tests/test_shards.py,tests/test_streaming.py,tests/test_methods.py,tests/test_api_cli.py",
    )
    parser.add_argument("--auto", default="", help="comma-separated files: mutate every listed token of them")
    parser.add_argument("--list", action="store_true", help="with --auto: only print the mutants")
    parser.add_argument("--start", type=int, default=0, help="with --auto: skip the first N mutants (continue a run)")
    parser.add_argument("--changed-since", default=None, help="with --auto: only lines changed since this git revision")
    args = parser.parse_args(argv)
    if args.auto and args.list:
        for file in args.auto.split(","):
            wanted = None if args.changed_since is None else changed_lines(file, args.changed_since)
            for _, row, _, mutant in auto_mutants(file):
                if wanted is None or row in wanted:
                    print(f"{file}:{row}: {mutant.strip()}")
        return
    tests = args.tests.split(",")
    results = run_auto(args.auto.split(","), tests, args.start, args.changed_since) if args.auto else run(tests)
    survived = [r for r in results if not r[2]]
    print(f"{len(results) - len(survived)} of {len(results)} mutants killed")


if __name__ == "__main__":
    main()
