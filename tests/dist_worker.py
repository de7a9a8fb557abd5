"""One process of a multi-rank test run (``tests/test_distributed.py``), started like torchrun starts one.

``python tests/dist_worker.py SPEC.json``: joins the Gloo group that ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR`` / ``MASTER_PORT`` describe (none when ``WORLD_SIZE`` is 1), then for each run in the
spec prunes a fresh tiny model with ``oneshot.prune`` and saves its weights and report as
``<out>/<run>.rank<r>.pt``. With ``"fail"`` in the spec, rank ``fail["rank"]`` dies (SIGKILL) or
raises at block ``fail["block"]``, the way a crashed or killed rank would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout

from conftest import VOCAB, _tiny_configs  # noqa: E402

import oneshot  # noqa: E402
from oneshot import engine  # noqa: E402
from oneshot.errors import NumericalError  # noqa: E402


def calibration(nsamples: int, seqlen: int) -> torch.Tensor:
    """The same random token ids on every rank (the global draw)."""
    return torch.randint(4, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(1))


def arm_failure(fail: dict[str, Any], rank: int) -> None:
    """Make this rank die or raise when the sweep reaches ``fail["block"]`` (test code, not the library's)."""
    if rank != fail["rank"]:
        return
    original = engine.check_weights

    if fail["how"] == "raise-solve":  # inside the owner's solve of a block's first layer group
        solve = engine._visit

        def visit(*args: Any) -> None:
            if args[3] == fail["block"]:
                raise NumericalError("the Cholesky factorisation failed (injected by the test)")
            solve(*args)

        engine._visit = visit  # type: ignore[assignment]
        return

    def check(blocks_name: str, index: int, linears: dict[str, torch.nn.Module]) -> None:
        if index == fail["block"]:
            if fail["how"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise NumericalError("the Cholesky factorisation failed (injected by the test)")
        original(blocks_name, index, linears)

    engine.check_weights = check  # type: ignore[assignment]


def arm_perturbation(rank: int, perturb: dict[str, Any]) -> None:
    """Make rank ``perturb["rank"]``'s solves come out slightly different (as on other hardware)."""
    if rank != perturb["rank"]:
        return
    original = engine._visit

    def visit(*args: Any) -> None:
        original(*args)
        linears, group = args[4], args[5]
        with torch.no_grad():
            for name in group:
                linears[name].weight.add_(1e-3)

    engine._visit = visit  # type: ignore[assignment]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    if "fail" in spec:
        arm_failure(spec["fail"], rank)
    if "perturb" in spec:
        arm_perturbation(rank, spec["perturb"])
    out = Path(spec["out"])
    ids = calibration(spec.get("nsamples", 8), spec.get("seqlen", 32))
    for name, options in spec["runs"].items():
        torch.manual_seed(0)
        model = spec.get("checkpoint") or _tiny_configs()[spec["family"]]().eval()
        report = oneshot.prune(model, calibration=ids, quiet=True, **options)
        state = {} if isinstance(model, str) else {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "report": report.to_dict()}, out / f"{name}.rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
