"""One-token mutants of the code a change touched, each run against the fast tests that should kill it.

A mutant that survives is a missing test or dead code. The list is explicit (file, original, mutant)
so the report says exactly what was tried; each file is restored after its mutant runs.

    .venv/bin/python -m benchmarks.mutants --tests tests/test_shards.py,tests/test_streaming.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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
    ("oneshot/activations.py", "target = self.current\n", "target = 1 - self.current\n"),
    ("oneshot/activations.py", "self.current = 1 - self.current", "self.current = self.current"),
    ("oneshot/activations.py", "return sum(math.prod(s) for s in self.shapes[:batch]) * self._itemsize",
     "return sum(math.prod(s) for s in self.shapes[: batch + 1]) * self._itemsize"),
    ("oneshot/streaming.py", 'self.progress["next_block"] = index + 1', 'self.progress["next_block"] = index'),
    ("oneshot/streaming.py", 'RESUME_FREE = ("quiet", "resume", "device", "stream", "max_memory")',
     'RESUME_FREE = ("quiet", "resume", "device", "stream", "max_memory", "sparsity")'),
    ("oneshot/streaming.py", "if not name.startswith(inside) and id(param) not in skip and name in self.keys",
     "if id(param) not in skip and name in self.keys"),
    ("oneshot/streaming.py", "value.to(self._param_dtype[name]) if name is not None else value", "value"),
    ("oneshot/streaming.py", "h.update(calib.attention_mask.to(torch.int64).numpy().tobytes())", "pass"),
    ("oneshot/engine.py", "sink = store.put if io.start == 0 else (lambda b, h: None)", "sink = store.put"),
    ("oneshot/checkpoint.py", "if path.stat().st_size < 8 + size + end:", "if path.stat().st_size < 8 + size:"),
    ("oneshot/checkpoint.py", 'candidates += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]', "pass"),
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
    args = parser.parse_args(argv)
    results = run(args.tests.split(","))
    survived = [r for r in results if not r[2]]
    print(f"{len(results) - len(survived)} of {len(results)} mutants killed")


if __name__ == "__main__":
    main()
