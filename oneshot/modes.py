"""Which option works in which mode: in memory, streamed, over several processes, on a GPU.

:data:`ROWS` is the table ``docs/modes.md`` is generated from (``oneshot modes``): each
option with, per mode, the test that checks it there or the refusal a run meets. The refusals live
here, in :func:`refusal`, which the run calls before any work; ``tests/test_modes.py`` keeps the
table true (the file is current, every test named exists, every refusal is the run's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oneshot.config import RESUME_IN_MEMORY, PruneConfig

MEMORY, STREAMING, TORCHRUN, CUDA = "in memory", "streaming", "torchrun", "cuda"
MODES = (MEMORY, STREAMING, TORCHRUN, CUDA)

#: Said of a GPU cell no test here can check (CI has no GPU): the code path is the CPU's with the
#: block on ``--device``; the measured agreement is in ``benchmarks/results/gpu_device_agreement*.md``.
GPU_UNCHECKED = "same code on --device cuda; not run on a GPU"

_ONE = "run it as one process (without torchrun)"


def refusal(config: PruneConfig, mode: str) -> str | None:
    """Why ``config`` cannot run in ``mode`` (a one-line error with the way out), or None."""
    if mode == TORCHRUN and config.refine == "block" and config.quantizes:
        return (
            f"--refine block of a quantized run tunes the grids each layer's owner rank holds: {_ONE}, or "
            "refine the pruned weights over several ranks without a quantizer"
        )
    if mode == MEMORY and config.resume:
        return RESUME_IN_MEMORY
    return None


@dataclass(frozen=True)
class Row:
    """One option: the run options that show it and, per mode, the test that checks it (``file::test``)."""

    option: str
    options: dict[str, Any]
    tests: dict[str, str] = field(default_factory=dict)


_SPARSE = {"sparsity": 0.5}
_DIST = "tests/test_distributed.py::"
_STREAM = "tests/test_modes.py::test_streaming_equals_in_memory"
_GPU = "benchmarks/results/gpu_device_agreement.md"

ROWS: tuple[Row, ...] = (
    Row("--method magnitude", {"method": "magnitude", **_SPARSE}, {
        MEMORY: "tests/test_methods.py::test_every_method_hits_exact_sparsity", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_give_the_single_process_tensors"}),
    Row("--method wanda", {"method": "wanda", **_SPARSE}, {
        MEMORY: "tests/test_methods.py::test_wanda_hand_computed", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_give_the_single_process_tensors", CUDA: _GPU}),
    Row("--method sparsegpt", {"method": "sparsegpt", **_SPARSE}, {
        MEMORY: "tests/test_methods.py::test_sparsegpt_equals_unblocked_obs_reference", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_solve_like_one", CUDA: "benchmarks/results/gpu_device_agreement_sgpt.md"}),
    Row("--method obs", {"method": "obs", **_SPARSE}, {
        MEMORY: "tests/test_obs.py::test_obs_matches_brute_force_greedy", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_solve_like_one"}),
    Row("--method ria", {"method": "ria", **_SPARSE}, {
        MEMORY: "tests/test_ria_dsnot.py::test_ria_score_hand_computed", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_give_the_single_process_tensors"}),
    Row("--refine dsnot", {"method": "wanda", "refine": "dsnot", **_SPARSE}, {
        MEMORY: "tests/test_ria_dsnot.py::test_dsnot_equals_a_loop_reference_and_keeps_counts", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_give_the_single_process_tensors"}),
    Row("--method fisher", {"method": "fisher", **_SPARSE}, {
        MEMORY: "tests/test_fisher.py::test_empirical_fisher_is_the_mean_of_per_sample_squared_gradients",
        STREAMING: "tests/test_fisher.py::test_fisher_streamed_prunes_as_in_memory",
        TORCHRUN: _DIST + "test_two_ranks_give_the_single_process_tensors"}),
    Row("--nm 2:4", {"method": "sparsegpt", "nm": "2:4"}, {
        MEMORY: "tests/test_methods.py::test_nm_mask_pattern", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_solve_like_one"}),
    Row("--sparsity-map", {"method": "wanda", **_SPARSE, "sparsity_map": {"*.1.mlp.*": "skip"}}, {
        MEMORY: "tests/test_allocation.py::test_sparsity_map_overrides_and_errors", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_give_the_single_process_tensors"}),
    Row("--passes single", {"method": "wanda", **_SPARSE, "passes": "single"}, {
        MEMORY: "tests/test_single_pass.py::test_single_pass_equals_two_passes_when_layers_do_not_feed_each_other",
        STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_give_the_single_process_tensors"}),
    Row("--owl", {"method": "wanda", "sparsity": 0.6, "owl": True}, {
        MEMORY: "tests/test_allocation.py::test_owl_ratios_equal_a_reference", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_give_the_single_process_tensors"}),
    Row("--allocate sensitivity", {"method": "wanda", "sparsity": 0.6, "allocate": "sensitivity"}, {
        MEMORY: "tests/test_sensitivity.py::test_engine_allocates_from_measured_errors",
        STREAMING: _STREAM, TORCHRUN: _DIST + "test_sensitivity_allocation_on_two_ranks_equals_one_process"}),
    Row("--allocate-error fisher", {"method": "wanda", "sparsity": 0.6, "allocate": "sensitivity",
                                    "allocate_error": "fisher"}, {
        MEMORY: "tests/test_sensitivity.py::test_fisher_error_weights_each_block_by_energy_and_gradient",
        STREAMING: "tests/test_sensitivity.py::test_fisher_error_streamed_equals_in_memory",
        TORCHRUN: _DIST + "test_sensitivity_allocation_on_two_ranks_equals_one_process"}),
    Row("--refine block", {"method": "sparsegpt", "sparsity": 0.7, "refine": "block"}, {
        MEMORY: "tests/test_refine_block.py::test_refit_lowers_the_error_monotonically_and_keeps_masks",
        STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_block_reconstruction_on_two_ranks_equals_one_process"}),
    Row("--method structured", {"method": "structured", "ratio": 0.5, "target": "both"}, {
        MEMORY: "tests/test_structured.py::test_structured_equals_a_step_by_step_reference", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_two_ranks_remove_the_same_units"}),
    Row("--method gptq", {"method": "gptq", "group_size": 32}, {
        MEMORY: "tests/test_gptq.py::test_gptq_equals_the_unblocked_reference", STREAMING: _STREAM,
        TORCHRUN: _DIST + "test_bert_and_a_quantized_output_on_two_ranks"}),
    Row("--then gptq", {"method": "sparsegpt", **_SPARSE, "then": "gptq", "group_size": 32}, {
        MEMORY: "tests/test_quantize.py::test_pruned_and_quantized_model_reloads_with_stock_transformers",
        STREAMING: _STREAM, TORCHRUN: _DIST + "test_bert_and_a_quantized_output_on_two_ranks"}),
    Row("--refine block --then gptq", {"method": "sparsegpt", **_SPARSE, "then": "gptq", "group_size": 32,
                                       "refine": "block"}, {
        MEMORY: "tests/test_quant_refit.py::test_quantized_run_tunes_every_block_and_saves_the_tuned_grid",
        STREAMING: _STREAM}),
    Row("--resume", {"method": "wanda", **_SPARSE, "resume": True}, {
        STREAMING: "tests/test_streaming.py::test_sigkill_then_resume_is_identical",
        TORCHRUN: _DIST + "test_a_killed_rank_resumes_where_the_record_says"}),
)  # fmt: skip


def cell(row: Row, mode: str) -> str:
    """What the table says of ``row`` in ``mode``: the refusal, the test, or that it is not checked here."""
    why = refusal(PruneConfig(**row.options), mode)
    if why is not None:
        return f"refused: {why}"
    found = row.tests.get(mode)
    if found is not None:
        return f"yes (`{found}`)"
    return GPU_UNCHECKED if mode == CUDA else "not checked"


def markdown() -> str:
    """``docs/modes.md``: the whole table."""
    lines = [
        "# Options by mode",
        "",
        "Generated from `oneshot/modes.py` by `oneshot modes > docs/modes.md`; "
        "`tests/test_modes.py` checks that this file is current, that every test named exists and that every "
        "refusal is what a run says. In memory: the model loaded whole; streaming: `--stream`, block by block from "
        "the shards; torchrun: several processes (`torchrun --nproc-per-node N -m oneshot prune ...`), each with "
        "its share of the calibration samples; cuda: `--device cuda`.",
        "",
        "| option | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for row in ROWS:
        lines.append(f"| `{row.option}` | " + " | ".join(cell(row, mode) for mode in MODES) + " |")
    return "\n".join(lines) + "\n"
