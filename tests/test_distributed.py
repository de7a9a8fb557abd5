"""Runs over several processes (torch.distributed, Gloo on CPU) equal the single-process run.

Each test starts 2 ranks the way torchrun does (``RANK`` / ``WORLD_SIZE`` / ``MASTER_*``) plus a
single-process reference, all one thread each, running ``tests/dist_worker.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from oneshot.calibration.stats import ColumnSqNorm, Hessian, MeanVar
from oneshot.config import PruneConfig
from oneshot.distributed import Ranks, fingerprint

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(spec: dict[str, Any], folder: Path, world: int, rank: int, port: int) -> subprocess.Popen[str]:
    folder.mkdir(parents=True, exist_ok=True)
    runs = {
        name: {**run, "out": str(folder / run["out"])} if "out" in run else run for name, run in spec["runs"].items()
    }
    path = folder / f"spec.rank{rank}.json"
    path.write_text(json.dumps({**spec, "runs": runs, "out": str(folder)}))
    env = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def launch(spec: dict[str, Any], tmp: Path, reference: bool = True) -> list[tuple[int, str]]:
    """2 ranks under ``tmp/ranks`` (and a single process under ``tmp/one``); (exit code, output) per rank."""
    port = _port()
    procs = [_start(spec, tmp / "ranks", 2, r, port) for r in range(2)]
    if reference:
        procs.append(_start(spec, tmp / "one", 1, 0, _port()))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        results.append((proc.returncode, out))
    for code, out in results if reference else []:
        assert code == 0, out[-3000:]
    return results


def load(tmp: Path, run: str, rank: int = 0, one: bool = False) -> dict[str, Any]:
    found: dict[str, Any] = torch.load(tmp / ("one" if one else "ranks") / f"{run}.rank{rank}.pt", weights_only=False)
    return found


def pruned_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The linear weights inside the blocks (LLaMA's ``layers``, BERT's ``layer``)."""
    return [k for k, v in state.items() if v.dim() == 2 and (".layers." in k or ".layer." in k)]


def assert_identical(tmp: Path, run: str) -> None:
    ref = load(tmp, run, one=True)
    for rank in range(2):
        got = load(tmp, run, rank)
        assert got["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            assert torch.equal(got["state"][key], value), (run, rank, key)
        assert [r["name"] for r in got["report"]["layers"]] == [r["name"] for r in ref["report"]["layers"]]
        assert [r.get("achieved_sparsity", r.get("removed")) for r in got["report"]["layers"]] == [
            r.get("achieved_sparsity", r.get("removed")) for r in ref["report"]["layers"]
        ]  # a structured run's layers: the units removed from their inputs


def assert_close(tmp: Path, run: str) -> None:
    """Same masks on at least 99.9% of the pruned weights, weights within float tolerance."""
    ref = load(tmp, run, one=True)
    for rank in range(2):
        got = load(tmp, run, rank)
        differ = total = 0
        for key in pruned_keys(ref["state"]):
            a, b = got["state"][key], ref["state"][key]
            differ += int(((a == 0) != (b == 0)).sum())
            total += b.numel()
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert total > 0 and differ <= total * 0.001, (run, differ, total)


LLAMA_RUNS: dict[str, dict[str, Any]] = {
    "wanda": {"method": "wanda", "sparsity": 0.5, "batch_size": 2, "passes": "two"},
    "wanda_single": {"method": "wanda", "sparsity": 0.5, "passes": "single"},
    "magnitude": {"method": "magnitude", "sparsity": 0.5},
    "owl": {"method": "wanda", "sparsity": 0.6, "owl": True, "batch_size": 2, "passes": "two"},
    "fisher": {"method": "fisher", "sparsity": 0.5, "batch_size": 2, "passes": "two"},  # gradients all-reduced
    "skip": {
        "method": "wanda",
        "sparsity": 0.5,
        "batch_size": 2,
        "passes": "two",
        "sparsity_map": {"*.2.mlp.*": "skip"},
    },
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5, "batch_size": 2, "passes": "two"},
    "sparsegpt_single": {"method": "sparsegpt", "sparsity": 0.5, "nm": "2:4", "passes": "single"},
    "sparsegpt_auto": {"method": "sparsegpt", "sparsity": 0.5},  # --passes auto: the measured cost model
    "obs": {"method": "obs", "sparsity": 0.5, "batch_size": 2},
    "structured": {"method": "structured", "ratio": 0.5, "target": "both", "batch_size": 2},
    "ria": {"method": "ria", "sparsity": 0.5, "batch_size": 2, "passes": "two"},
    "dsnot": {"method": "wanda", "refine": "dsnot", "sparsity": 0.5, "batch_size": 2, "passes": "two"},
}


REFIT_RUNS: dict[str, dict[str, Any]] = {
    "refit": {"method": "sparsegpt", "sparsity": 0.7, "refine": "block", "batch_size": 8, "recon_epochs": 3},
    "refit_owl": {"method": "wanda", "sparsity": 0.6, "refine": "block", "batch_size": 8, "owl": True,
                  "sparsity_map": {"*.1.mlp.*": "skip"}},
}  # fmt: skip


def test_block_reconstruction_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Each Adam step sums the ranks' gradients (each rank's batch k, the loss over the global target
    energy) and a pass is kept on the global error: the refitted weights equal one process's (whose
    one batch holds both ranks' samples) within float tolerance; layers a map skips stay as they were."""
    launch({"family": "llama", "runs": REFIT_RUNS}, tmp_path)
    for run in REFIT_RUNS:
        assert_close(tmp_path, run)
        ref = load(tmp_path, run, one=True)["report"]["block_refit"]
        for rank in range(2):
            got = load(tmp_path, run, rank)["report"]["block_refit"]
            assert [len(r["errors"]) for r in got] == [len(r["errors"]) for r in ref]
            for mine, theirs in zip(got, ref, strict=True):
                assert mine["errors"] == pytest.approx(theirs["errors"], rel=1e-4)
        assert all(r["errors"][-1] < r["errors"][0] for r in ref)


SENSITIVITY_RUNS: dict[str, dict[str, Any]] = {
    "relative": {"method": "wanda", "sparsity": 0.6, "allocate": "sensitivity", "batch_size": 2},
    "fisher": {"method": "wanda", "sparsity": 0.6, "allocate": "sensitivity", "allocate_error": "fisher",
               "batch_size": 2},
}  # fmt: skip


def test_sensitivity_allocation_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """The probe errors' sums (and the Fisher weights' gradient sums) are reduced over the ranks: every
    rank allocates what one process allocates, and the pruned tensors are the same."""
    launch({"family": "llama", "runs": SENSITIVITY_RUNS}, tmp_path)
    for run in SENSITIVITY_RUNS:
        ref = load(tmp_path, run, one=True)["report"]["sensitivity"]
        for rank in range(2):
            got = load(tmp_path, run, rank)["report"]["sensitivity"]
            assert [b["sparsity"] for b in got["blocks"]] == [b["sparsity"] for b in ref["blocks"]]
            for mine, theirs in zip(got["blocks"], ref["blocks"], strict=True):
                assert mine["errors"] == pytest.approx(theirs["errors"], rel=1e-6)
        assert len({b["sparsity"] for b in ref["blocks"]}) > 1  # the allocation is not uniform
        assert_close(tmp_path, run)


MOE_RUNS: dict[str, dict[str, Any]] = {
    "wanda": {"method": "wanda", "sparsity": 0.5, "batch_size": 2},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5, "batch_size": 2},
    "rare": {"method": "wanda", "sparsity": 0.5, "batch_size": 2, "expert_min_tokens": 64},
}


def test_a_mixture_of_experts_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Each expert's statistics are reduced over the ranks (an expert may get no token on one rank),
    its rare-token rule decided on the global count, its solve owned by one rank: Wanda bit for bit."""
    launch({"family": "qwen3_moe", "runs": MOE_RUNS}, tmp_path)
    assert_identical(tmp_path, "wanda")
    assert_identical(tmp_path, "rare")
    assert_close(tmp_path, "sparsegpt")
    report = load(tmp_path, "rare")["report"]
    experts = [r for r in report["layers"] if r["routed_tokens"] is not None]
    assert any(r["tokens"] > r["routed_tokens"] for r in experts) and any(
        r["tokens"] == r["routed_tokens"] for r in experts
    )
    assert report["passes"] == "two"


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dist-llama")
    results = launch({"family": "llama", "runs": LLAMA_RUNS}, tmp)
    for _, output in results:  # the single passes' solves agree on every rank: no fallback broadcast
        assert "differ" not in output
    return tmp


@pytest.mark.parametrize("run", ["wanda", "wanda_single", "magnitude", "owl", "fisher", "skip", "ria", "dsnot"])
def test_two_ranks_give_the_single_process_tensors(llama_runs: Path, run: str) -> None:
    assert_identical(llama_runs, run)


def test_layers_left_dense_are_reported_by_every_rank(llama_runs: Path) -> None:
    ref = load(llama_runs, "skip", one=True)["report"]["skipped_layers"]
    assert ref == [f"model.layers.2.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    for rank in range(2):  # the owners' skip lists gathered after the last block too, in layer order
        assert load(llama_runs, "skip", rank)["report"]["skipped_layers"] == ref


@pytest.mark.parametrize("run", ["sparsegpt", "sparsegpt_single", "obs"])
def test_two_ranks_solve_like_one(llama_runs: Path, run: str) -> None:
    assert_close(llama_runs, run)


def test_passes_auto_on_two_ranks_follows_the_measured_costs(llama_runs: Path) -> None:
    """Every rank sweeps as rank 0's measurement says (the cheaper estimate), and the report shows it;
    one process has nothing to spread, so it measures nothing."""
    first = load(llama_runs, "sparsegpt_auto")["report"]
    cost = first["passes_cost"]
    assert cost["world_size"] == 2 and cost["forward_seconds"] > 0 and cost["solve_seconds"] > 0
    cheaper = "two" if cost["two_seconds_per_block"] < cost["single_seconds_per_block"] else "single"
    assert cost["chosen"] == cheaper and first["passes"] == cheaper
    assert first["passes_reason"].endswith(cheaper) and "measured on this device" in first["passes_reason"]
    second = load(llama_runs, "sparsegpt_auto", 1)["report"]
    assert second["passes_cost"] == cost and second["passes"] == cheaper
    one = load(llama_runs, "sparsegpt_auto", one=True)["report"]
    assert "passes_cost" not in one and one["passes"] == "single"
    if cheaper == "single":
        assert_close(llama_runs, "sparsegpt_auto")


def test_two_ranks_remove_the_same_units(llama_runs: Path) -> None:
    def units(report: dict[str, Any]) -> list[dict[str, Any]]:  # the error estimate is over rank 0's own tokens
        return [{k: v for k, v in u.items() if k != "relative_error"} for u in report["structured"]["blocks"]]

    ref = units(load(llama_runs, "structured", one=True)["report"])
    for rank in range(2):
        assert units(load(llama_runs, "structured", rank)["report"]) == ref
    assert_identical(llama_runs, "structured")


def test_report_says_world_size_and_traffic(llama_runs: Path) -> None:
    report = load(llama_runs, "sparsegpt")["report"]
    facts = report["distributed"]
    assert facts["world_size"] == 2 and facts["rank"] == 0
    assert facts["samples"] == [0, 4] and facts["nsamples_here"] == 4  # the first half of the 8 samples
    assert len(facts["bytes_per_block"]) == 3 and min(facts["bytes_per_block"]) > 0
    assert facts["bytes_communicated"] >= sum(facts["bytes_per_block"])  # + agreements outside the blocks
    # SparseGPT's Hessians are reduced: more traffic than Wanda's column norms
    assert sum(facts["bytes_per_block"]) > sum(load(llama_runs, "wanda")["report"]["distributed"]["bytes_per_block"])
    # per block: the four distinct inputs' Hessians all-reduced (3 x 64² + 96² fp32) and the block's
    # 30720 pruned weights broadcast by their owners (fp32), plus small agreements and records
    pinned = (3 * 64 * 64 + 96 * 96) * 4 + 30720 * 4
    assert all(pinned <= b <= pinned * 1.1 for b in facts["bytes_per_block"]), facts["bytes_per_block"]
    per_block = facts["communication_seconds_per_block"]
    assert len(per_block) == 3 and report["phase_seconds"]["communicate"] == pytest.approx(sum(per_block))
    assert 0 < sum(per_block) <= facts["communication_seconds"]
    assert "distributed" not in load(llama_runs, "sparsegpt", one=True)["report"]


def test_bert_and_a_quantized_output_on_two_ranks(tmp_path: Path) -> None:
    runs = {
        "wanda": {"method": "wanda", "sparsity": 0.5, "batch_size": 2, "passes": "two"},
        "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5, "batch_size": 2, "passes": "two"},
        "structured": {"method": "structured", "ratio": 0.25, "target": "mlp", "batch_size": 2},
    }
    launch({"family": "bert", "runs": runs}, tmp_path / "bert")
    assert_identical(tmp_path / "bert", "wanda")
    assert_close(tmp_path / "bert", "sparsegpt")
    assert_identical(tmp_path / "bert", "structured")

    pytest.importorskip("compressed_tensors")
    from conftest import saved_tensors

    quant = {
        "method": "sparsegpt",
        "sparsity": 0.5,
        "then": "gptq",
        "bits": 4,
        "group_size": 16,
        "batch_size": 2,
        "passes": "two",
        "out": "saved",
    }
    alone = {"method": "gptq", "bits": 4, "group_size": 16, "batch_size": 2, "passes": "two"}
    launch({"family": "llama", "runs": {"gptq": quant, "alone": alone}}, tmp_path / "llama")
    folders = {where: tmp_path / "llama" / where / "saved" for where in ("ranks", "one")}
    got, ref = saved_tensors(folders["ranks"]), saved_tensors(folders["one"])
    assert got.keys() == ref.keys() and any(k.endswith("weight_packed") for k in ref)
    for key, value in ref.items():  # every tensor there, same shapes and dtypes
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
    # GPTQ rounds column by column with error feedback: the reduced Hessian's last-bit differences flip
    # a few codes, and each flip changes the columns after it. Not bit-equal, but equally good:
    errors = {
        where: [r["relative_error"] for r in load(tmp_path / "llama", "gptq", one=where == "one")["report"]["layers"]]
        for where in ("ranks", "one")
    }
    assert len(errors["ranks"]) == len(errors["one"]) == 21
    mean = {where: sum(values) / len(values) for where, values in errors.items()}
    assert abs(mean["ranks"] - mean["one"]) < 0.05 * mean["one"], mean
    alone = {  # quantizing alone (--method gptq): the same
        where: load(tmp_path / "llama", "alone", one=where == "one")["report"]["layers"] for where in ("ranks", "one")
    }
    assert len(alone["ranks"]) == len(alone["one"]) == 21 and all(r["bits"] == 4 for r in alone["ranks"])
    mean = {where: sum(r["relative_error"] for r in rows) / len(rows) for where, rows in alone.items()}
    assert abs(mean["ranks"] - mean["one"]) < 0.05 * mean["one"], mean
    report = json.loads((folders["ranks"] / "oneshot_report.json").read_text())
    assert report["quantization"]["layers"] == 21 and report["distributed"]["world_size"] == 2


STREAMED_RUNS: dict[str, dict[str, Any]] = {
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "fisher": {"method": "fisher", "sparsity": 0.5},
    "allocate-fisher": {"method": "wanda", "sparsity": 0.6, "allocate": "sensitivity", "allocate_error": "fisher"},
}


@pytest.mark.parametrize("options", list(STREAMED_RUNS.values()), ids=list(STREAMED_RUNS))
def test_streaming_on_two_ranks_equals_one(tmp_path: Path, tiny_checkpoint: Any, options: dict[str, Any]) -> None:
    """Fisher streamed: each rank's backward on its share, the squared-gradient sums (and, for the
    allocation, the output-gradient sums and token counts) all-reduced."""
    from conftest import saved_tensors

    run = {**options, "batch_size": 2, "stream": True, "out": "o"}
    launch({"family": "llama", "checkpoint": str(tiny_checkpoint("llama")), "runs": {"s": run}}, tmp_path)
    got, ref = saved_tensors(tmp_path / "ranks" / "o"), saved_tensors(tmp_path / "one" / "o")
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key
    report = json.loads((tmp_path / "ranks" / "o" / "oneshot_report.json").read_text())
    assert report["mode"] == "streaming" and report["distributed"]["world_size"] == 2
    assert not list(tmp_path.glob("ranks/.o.oneshot-partial"))
    if "allocate" in options:
        one = json.loads((tmp_path / "one" / "o" / "oneshot_report.json").read_text())["sensitivity"]["blocks"]
        weights = [b["gradient_weight"] for b in report["sensitivity"]["blocks"]]
        assert weights == pytest.approx([b["gradient_weight"] for b in one], rel=1e-5) and len(set(weights)) > 1


def test_a_killed_rank_resumes_where_the_record_says(tmp_path: Path, tiny_checkpoint: Any) -> None:
    """SIGKILL rank 1 in block 1 of a streamed 2-rank run: the partial folder keeps rank 0's record and
    rank 1's activations (rank-1/); the same command with --resume continues from block 1 and gives the
    tensors of an uninterrupted run; another number of processes is refused with the reason."""
    from conftest import saved_tensors

    checkpoint = str(tiny_checkpoint("llama"))
    run: dict[str, Any] = {"method": "wanda", "sparsity": 0.5, "batch_size": 2, "stream": True, "out": "o"}
    spec: dict[str, Any] = {"family": "llama", "checkpoint": checkpoint, "runs": {"r": run}}
    (code0, log0), (code1, _) = launch({**spec, "fail": {"rank": 1, "block": 1, "how": "kill"}}, tmp_path, False)
    assert code0 != 0 and code1 == -9 and "--resume" in log0
    partial = tmp_path / "ranks" / ".o.oneshot-partial"
    assert json.loads((partial / "progress.json").read_text())["next_block"] == 1
    assert (partial / "rank-1" / "state.json").exists()
    import oneshot
    from oneshot.errors import OutputError

    ids = torch.randint(4, 128, (8, 32), generator=torch.Generator().manual_seed(1))  # the workers' calibration
    options = {k: v for k, v in run.items() if k != "out"}
    with pytest.raises(OutputError, match="it ran on 2 processes, this run has 1"):
        oneshot.prune(checkpoint, calibration=ids, out=tmp_path / "ranks" / "o", resume=True, quiet=True, **options)
    resumed = {**run, "resume": True}
    launch({**spec, "runs": {"r": resumed}}, tmp_path)  # and one process, uninterrupted (nothing to resume)
    got, ref = saved_tensors(tmp_path / "ranks" / "o"), saved_tensors(tmp_path / "one" / "o")
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key
    report = json.loads((tmp_path / "ranks" / "o" / "oneshot_report.json").read_text())
    assert report["resumed_from_block"] == 1 and report["distributed"]["world_size"] == 2
    assert not partial.exists()


@pytest.mark.parametrize(
    ("how", "stream", "passes"),
    [("kill", True, "two"), ("raise", False, "two"), ("raise-solve", False, "two"), ("raise-solve", False, "single")],
)
def test_a_failed_rank_stops_every_rank_and_nothing_is_written(
    tmp_path: Path, tiny_checkpoint: Any, how: str, stream: bool, passes: str
) -> None:
    out = tmp_path / "ranks" / "o"
    run: dict[str, Any] = {"method": "sparsegpt", "sparsity": 0.5, "passes": passes, "out": "o"}
    if passes == "two":
        run["batch_size"] = 2
    spec: dict[str, Any] = {"family": "llama", "runs": {"f": run}, "fail": {"rank": 1, "block": 1, "how": how}}
    if stream:
        spec["checkpoint"] = str(tiny_checkpoint("llama"))
        run["stream"] = True
    (code0, log0), (code1, log1) = launch(spec, tmp_path, reference=False)
    assert code0 != 0 and code1 != 0
    assert "DistributedError" in log0
    if how == "kill":
        assert code1 == -9
        assert "lost contact with the other ranks" in log0
    else:
        assert "rank 1 failed" in log0 and "injected by the test" in log0
        assert "NumericalError" in log1
    assert "no output is published" in log0
    assert not out.exists()
    partial = out.parent / ".o.oneshot-partial"
    if stream:  # the finished blocks and every rank's activations are kept for --resume
        assert (partial / "progress.json").exists() and "rerun with --resume" in log0
    else:
        assert not list(out.parent.glob(".o.oneshot-partial*"))


def test_a_single_pass_solves_on_every_rank_and_keeps_rank_0s_if_they_differ(tmp_path: Path) -> None:
    runs = {"w": {"method": "wanda", "sparsity": 0.5, "passes": "single"}}
    results = launch({"family": "llama", "runs": runs, "perturb": {"rank": 1}}, tmp_path)
    assert "solves of model.layers.0 differ" in results[0][1]
    assert_identical(tmp_path, "w")  # rank 1's weights replaced by rank 0's (the single-process ones)
    facts = load(tmp_path, "w")["report"]["distributed"]
    assert min(facts["bytes_per_block"]) > 0


def test_fingerprints_tell_tensors_apart() -> None:
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fingerprint(x), fingerprint(x.clone()))
    y = x.clone()
    y[500, 1] = torch.nextafter(y[500, 1], torch.tensor(9.0))  # one bit
    assert not torch.equal(fingerprint(x), fingerprint(y))
    swapped = x.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places: the weighted sum tells
    assert not torch.equal(fingerprint(x), fingerprint(swapped))
    assert torch.equal(fingerprint(x, chunk=7), fingerprint(x))
    half = x.to(torch.bfloat16)
    assert not torch.equal(fingerprint(half), fingerprint(half * 2))


def test_torchrun_runs_the_command_line(tmp_path: Path, tiny_checkpoint: Any, text_file: Path) -> None:
    out = tmp_path / "o"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port())]
    command += ["-m", "oneshot", "prune", str(tiny_checkpoint("llama")), "--method", "wanda", "--sparsity", "0.5"]
    command += ["--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("method wanda at 50%") == 1  # rank 0 prints the summary, rank 1 nothing
    assert "2 ranks:" in done.stdout
    report = json.loads((out / "oneshot_report.json").read_text())
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["samples"] == [0, 2]
    assert report["achieved_sparsity"] == pytest.approx(0.5)


# -- without processes ---------------------------------------------------------------------------


def test_shares_cover_the_samples_in_order() -> None:
    for n, world in ((8, 2), (9, 2), (10, 3), (3, 3)):
        shares = [Ranks(rank=r, world=world, device=torch.device("cpu")).bounds(n) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
        assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def test_a_share_needs_a_sample_per_rank() -> None:
    from oneshot.calibration.data import CalibrationSet
    from oneshot.errors import DataError

    ids = torch.arange(6).reshape(2, 3)
    shares = [Ranks(rank=r, world=2, device=torch.device("cpu")).share(CalibrationSet(ids)) for r in range(2)]
    assert [s.input_ids.tolist() for s in shares] == [[[0, 1, 2]], [[3, 4, 5]]]  # as many samples as ranks: one each
    with pytest.raises(DataError, match="--nsamples 3"):
        Ranks(rank=0, world=3, device=torch.device("cpu")).share(CalibrationSet(ids))


def test_owners_balance_cost_largest_first() -> None:
    ranks = Ranks(rank=0, world=2, device=torch.device("cpu"))
    assert (ranks.bytes, ranks.seconds, ranks.block_bytes) == (0, 0.0, [])  # nothing sent yet
    assert Ranks(rank=1, world=2, device=torch.device("cpu")).owners([3.0, 1.0, 1.0]) == [0, 1, 1]  # before a block
    ranks.begin_block()
    assert ranks.owners([1.0, 5.0, 3.0, 3.0]) == [0, 0, 1, 1]  # 5 -> r0, 3 -> r1, 3 -> r1 (3 < 5), 1 -> r0
    assert ranks.owners([2.0]) == [0]  # the block's load so far: r0 6, r1 6 -> r0
    assert ranks.owners([2.0]) == [1]
    ranks.begin_block()
    assert ranks.owners([4.0, 4.0, 4.0]) == [0, 1, 0]


def test_several_ranks_refuse_what_they_cannot_do() -> None:
    from oneshot.api import _check_distributed
    from oneshot.errors import ConfigError

    for options in ({"refine": "block", "then": "gptq"},):
        with pytest.raises(ConfigError, match="one process"):
            _check_distributed(PruneConfig(method="sparsegpt", sparsity=0.5, **options))
    _check_distributed(PruneConfig(method="sparsegpt", sparsity=0.5, refine="block"))
    _check_distributed(PruneConfig(method="sparsegpt", sparsity=0.5, owl=True))
    _check_distributed(PruneConfig(method="sparsegpt", sparsity=0.5, allocate="sensitivity"))


def test_prune_refuses_before_any_collective(monkeypatch: pytest.MonkeyPatch, tiny_model: Any) -> None:
    import oneshot
    from oneshot.errors import ConfigError

    fake = Ranks(rank=0, world=2, device=torch.device("cpu"))  # no group: any collective would fail
    monkeypatch.setattr(Ranks, "current", classmethod(lambda cls: fake))
    ids = torch.randint(4, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="one process"):
        oneshot.prune(tiny_model("llama"), calibration=ids, method="sparsegpt", sparsity=0.5, refine="block",
                      then="gptq", group_size=32)  # fmt: skip
    assert fake.bytes == 0


def test_solve_cost_of_a_layer_group() -> None:
    from torch import nn

    from oneshot.engine import _cost

    qkv = [nn.Linear(64, 64), nn.Linear(64, 16), nn.Linear(64, 16)]  # 96 rows reading 64 inputs
    assert _cost(qkv, ("hessian",)) == 96 * 64 * 64 + 64**3  # rows·in² (column loop) + in³ (Cholesky)
    assert _cost(qkv, ("col_sq_norm",)) == 96 * 64  # a score and a sort per weight
    assert _cost([nn.Linear(256, 64)], ("hessian",)) > _cost(qkv, ("hessian",))


def test_shares_merge_into_the_whole_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, generator=gen) * 3 + 1
    parts = (x[:110], x[110:250], x[250:])
    whole = MeanVar(7)
    whole.update(x)
    merged = MeanVar(7)
    for part in parts:
        one = MeanVar(7)
        one.update(part)
        merged.merge(one.count, one.mean, one.m2)
    assert merged.count == 300
    torch.testing.assert_close(merged.mean, whole.mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(merged.m2, whole.m2, atol=1e-9, rtol=1e-12)
    hessian = Hessian(7)
    hessian.update(x)
    hessian.count = 600
    torch.testing.assert_close(hessian.finalize(), x.T @ x / 600)


def test_column_norms_do_not_depend_on_the_batching() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=gen) * torch.rand(64, generator=gen) * 10
    whole, split = ColumnSqNorm(64), ColumnSqNorm(64)
    whole.update(x)
    for part in x.split(333):
        split.update(part)
    assert torch.equal(whole.finalize(), split.finalize())
    assert whole.finalize().dtype == torch.float32
