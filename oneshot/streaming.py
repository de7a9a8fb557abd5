"""Streaming runs: prune a checkpoint larger than memory, one block at a time, resumably.

:class:`StreamingRun` owns the temporary output folder ``.<out>.oneshot-partial`` next to ``--out``:
the output shards (written as each block finishes), the calibration activations (two files, see
:class:`~oneshot.activations.DiskStore`) and ``progress.json``, rewritten atomically after every
block once the block's tensors and the next block's inputs are on disk. ``--resume`` reopens that
folder, refuses it if the checkpoint, the configuration or the calibration tokens changed, and
continues from the first unfinished block; the result is the same as an uninterrupted run. At the
end the shards get their final names, config, tokenizer and report are written, every tensor is
re-read and checked, and the folder is renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oneshot.activations import DiskStore
from oneshot.calibration.data import CalibrationSet
from oneshot.checkpoint import (
    Checkpoint,
    build_skeleton,
    checkpoint_keys,
    checkpoint_names,
    expert_checkpoint_keys,
    expert_weight_keys,
    from_checkpoint_names,
    materialise,
    release,
)
from oneshot.config import RUN_ONLY, PruneConfig
from oneshot.distributed import Ranks, guarded
from oneshot.engine import SweepIO
from oneshot.errors import OutputError
from oneshot.experts import ExpertProjection, experts_modules, is_experts, projections
from oneshot.layers import find_blocks, modules_and_layers, weight_of
from oneshot.memory import default_budget
from oneshot.passes.reconstruct import RefitRecord
from oneshot.passes.unstructured import LayerRecord, SweepResult
from oneshot.quantized import QuantizedLayer, check_layer
from oneshot.shards import ShardWriter, fsync_path, header_room, replace_durably, verify_shards
from oneshot.writer import REPORT_FILE, add_quantization_config, publish, unquantized_linears, write_run_files

log = logging.getLogger(__name__)

#: A reading rank's record of its activations, in its ``rank-R/`` folder of the partial folder.
RANK_STATE = "state.json"
PROGRESS_FILE = "progress.json"
MAX_SHARD_BYTES = 2 * 10**9


def partial_dir(out: Path) -> Path:
    """The temporary folder a streaming run into ``out`` writes to (and resumes from)."""
    return out.parent / f".{out.name}.oneshot-partial"


def calibration_digest(calib: CalibrationSet | None) -> str:
    """A digest of the calibration token ids and mask (a resume must use the very same tokens)."""
    return "no calibration data" if calib is None else calib.digest()


def _semantic(config: PruneConfig) -> dict[str, Any]:
    data = config.to_dict()
    for key in RUN_ONLY:  # a resume may differ in these
        data.pop(key, None)
    normalised: dict[str, Any] = json.loads(json.dumps(data))  # tuples -> lists, as read back from disk
    return normalised


class StreamingSource:
    """Block weights read from the checkpoint's shards when the sweep reaches them, freed after."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module) -> None:
        self.checkpoint = checkpoint
        self.blocks_name, self.blocks = find_blocks(model)
        self.converted: dict[str, list[str]] = {}  # a fused parameter -> the checkpoint tensors it is built from
        self.keys = checkpoint_keys(model, checkpoint, converted=self.converted)  # parameter name -> checkpoint key
        self.model = model
        self._untied_head: nn.Parameter | None = None  # the head's own (meta) weight while it shares the embeddings'

    def block_prefix(self, index: int) -> str:
        """Qualified-name prefix of block ``index``'s parameters."""
        return f"{self.blocks_name}.{index}."

    def load(self, index: int, block: nn.Module) -> None:
        """Read block ``index``'s tensors from the shards into the skeleton."""
        prefix = self.block_prefix(index)
        wanted = {name: key for name, key in self.keys.items() if name.startswith(prefix)}
        fused = {key for name, keys in self.converted.items() if name.startswith(prefix) for key in keys}
        values = self.checkpoint.read(set(wanted.values()))
        if fused:  # per-expert tensors into the fused parameters, as from_pretrained builds them
            built = self._fuse(prefix, block, fused)
            values.update(built)
            wanted.update({name: name for name in built})
        materialise(block, prefix, values, wanted)

    def _fuse(self, prefix: str, block: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
        """The block's fused expert parameters built from the per-expert tensors ``keys``, by name.

        Each tensor is read and copied into its projection's view of the fused parameter one at a
        time, so the block takes its own bytes in memory once (transformers' conversion mapping
        reads every per-expert tensor, stacks and concatenates: three copies of the experts at the
        peak). Where a checkpoint tensor is not one projection's weight as the model holds it, the
        conversion mapping itself builds the parameters.
        """
        built: dict[str, torch.Tensor] = {}
        targets: dict[str, tuple[str, ExpertProjection]] = {}  # checkpoint key -> (fused parameter, projection)
        for name, experts in experts_modules(block).items():
            made = projections(experts)
            for layer, key in expert_checkpoint_keys(self.model, prefix + name, experts).items():
                projection = made[layer.removeprefix(f"{prefix}{name}.")]
                fused_name = f"{prefix}{name}.{projection.fused_name}"
                if fused_name not in built:
                    param = getattr(experts, projection.fused_name)
                    built[fused_name] = torch.empty(param.shape, dtype=param.dtype)
                targets[key] = (fused_name, projection)
        sources: dict[str, set[str]] = {}
        for key, (fused_name, _) in targets.items():
            sources.setdefault(fused_name, set()).add(key)
        fits = all(set(self.converted.get(name, ())) == keys_of for name, keys_of in sources.items()) and all(
            self.checkpoint.tensors[k].shape == tuple(p.select(built[f]).shape) for k, (f, p) in targets.items()
        )
        if not fits:
            return from_checkpoint_names(self.model, self.checkpoint.read(keys))
        for key in sorted(keys & set(targets)):
            fused_name, projection = targets[key]
            self.checkpoint.read_into(key, projection.select(built[fused_name]))
        rest = keys - set(targets)  # renamed, not fused (Mixtral's router): the conversion mapping names them
        if rest:
            built.update(from_checkpoint_names(self.model, self.checkpoint.read(rest)))
        return built

    def saved_tensors(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """A parameter's tensors as the checkpoint stores them, by key (a fused one: per expert).

        An experts module's fused parameter gives each expert's projection as a view of ``tensor``
        (no copy of the block while it waits to be written); where the keys do not map to the
        projections, transformers' reverse conversion makes them.
        """
        if name not in self.converted:
            return [(self.keys.get(name, name), tensor)]
        module_name, _, attr = name.rpartition(".")
        experts = self.model.get_submodule(module_name)
        if is_experts(experts):
            made = projections(experts)
            keys = expert_checkpoint_keys(self.model, module_name, experts)
            views = [(keys[f"{module_name}.{n}"], p.select(tensor)) for n, p in made.items() if p.fused_name == attr
                     if f"{module_name}.{n}" in keys]  # fmt: skip
            if {key for key, _ in views} == set(self.converted[name]):
                return views
        return list(checkpoint_names(self.model, {name: tensor}).items())

    def unload(self, index: int, block: nn.Module) -> None:
        """Free block ``index``'s weights (back to the meta device)."""
        release(block)

    def outside_keys(self) -> list[str]:
        """Checkpoint keys that no block parameter maps to (embeddings, norms, head, buffers)."""
        inside = {key for name, key in self.keys.items() if name.startswith(f"{self.blocks_name}.")}
        inside.update(key for keys in self.converted.values() for key in keys)
        return [k for k in self.checkpoint.tensors if k not in inside]

    def _head(self, model: nn.Module) -> nn.Module | None:
        getter: Any = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        return head if isinstance(head, nn.Module) else None

    def load_head(self, model: nn.Module) -> None:
        """Materialise the output head (a loss needs it; :meth:`load_stem` leaves it out).

        A head the checkpoint does not store (tied word embeddings) shares the input embeddings'
        weight until :meth:`unload_head`.
        """
        head = self._head(model)
        if head is None:
            return
        names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        wanted = {names[id(p)]: self.keys[names[id(p)]] for p in head.parameters() if names[id(p)] in self.keys}
        materialise(model, "", self.checkpoint.read(set(wanted.values())), wanted)
        weight = getattr(head, "weight", None)
        embeddings: Any = getattr(model, "get_input_embeddings", lambda: None)()
        if isinstance(weight, nn.Parameter) and weight.device.type == "meta" and isinstance(embeddings, nn.Module):
            self._untied_head = weight
            head.weight = embeddings.weight

    def unload_head(self, model: nn.Module) -> None:
        """Free the output head again (a head sharing the input embeddings' weight gets its own back)."""
        head = self._head(model)
        if head is None:
            return
        if self._untied_head is not None:
            head.weight, self._untied_head = self._untied_head, None
            return
        embeddings: Any = getattr(model, "get_input_embeddings", lambda: None)()
        shared = {id(p) for p in embeddings.parameters()} if isinstance(embeddings, nn.Module) else set()
        if not {id(p) for p in head.parameters()} <= shared:
            release(head)

    def load_stem(self, model: nn.Module) -> None:
        """Materialise every parameter outside the blocks except an untied output head (capture needs none)."""
        getter: Any = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        inside = f"{self.blocks_name}."
        wanted = {
            name: key
            for name, param in model.named_parameters()
            if not name.startswith(inside) and id(param) not in skip and name in self.keys
            for key in [self.keys[name]]
        }
        materialise(model, "", self.checkpoint.read(set(wanted.values())), wanted)


class StreamingRun:
    """One streaming run into ``out``: the skeleton, the partial folder, progress, writer and activations.

    With ``writes=False`` (a rank other than 0 of a run over several processes) it only reads: the
    blocks from the shards and its own activations in a scratch folder, removed by :meth:`close`.
    """

    def __init__(
        self,
        folder: Path,
        config: PruneConfig,
        out: Path,
        overwrite: bool,
        dtype: torch.dtype,
        ranks: Ranks | None = None,
    ) -> None:
        self.folder = folder
        self.ranks = ranks
        self.writes = ranks is None or ranks.writes
        self.world = 1 if ranks is None else ranks.world
        self.scratch: Path | None = None
        self.config = config
        self.out = out
        self.overwrite = overwrite
        self.checkpoint = Checkpoint(folder)
        self.model = build_skeleton(folder, dtype)
        self.source = StreamingSource(self.checkpoint, self.model)
        self.partial = partial_dir(out)
        self.progress: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.prior_seconds = 0.0  # seconds the interrupted run(s) spent on the blocks a resume keeps
        self.writer: ShardWriter | None = None
        self.store: DiskStore | None = None
        self._param_dtype = {name: p.dtype for name, p in self.model.named_parameters()}
        # the activations stay in memory (written behind) while two sets fit half the run's budget
        self._activation_budget = (config.max_memory or default_budget()) // 2
        self._job: threading.Thread | None = None  # the finished block being written behind the sweep
        self._job_error: BaseException | None = None

    # -- starting -----------------------------------------------------------------------------

    def begin(self, calib: CalibrationSet | None) -> None:
        """Create the partial folder, or reopen it with ``config.resume`` after checking it matches.

        Over several ranks rank 0 opens the folder first; every other rank then keeps its own
        activations in ``rank-R/`` inside it (resumed from the block rank 0's progress names).
        """
        if self.ranks is None:
            self._begin_writer(calib)
            return
        with guarded(self.ranks, "opening the partial folder"):
            if self.writes:
                self._begin_writer(calib)
        progress: dict[str, Any] = self.ranks.all_gather_object(self.progress if self.writes else {})[0]
        with guarded(self.ranks, "opening this rank's activations"):
            if not self.writes:
                self._begin_reader(progress)

    def _begin_reader(self, progress: dict[str, Any]) -> None:
        """A reading rank: its activations in ``rank-R/``, fresh or at rank 0's next block (``progress``)."""
        assert self.ranks is not None
        self.scratch = self.partial / f"rank-{self.ranks.rank}"
        start = int(progress.get("next_block", 0))
        if start:
            path = self.scratch / RANK_STATE
            states = json.loads(path.read_text())["states"] if path.exists() else {}
            if str(start) not in states:
                raise OutputError(
                    f"rank {self.ranks.rank} has no activations for block {start} in {self.scratch}: resume on the "
                    "machines the run started on, or --overwrite to start over"
                )
            self.store = self._new_store(self.scratch, states[str(start)])
            self.progress = {k: v for k, v in progress.items() if k not in ("writer", "store")}
        else:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch.mkdir(parents=True)
            self.store = self._new_store(self.scratch)
        self.source.load_stem(self.model)

    def _begin_writer(self, calib: CalibrationSet | None) -> None:
        identity = {
            "checkpoint": self.checkpoint.fingerprint(),
            "config": _semantic(self.config),
            "calibration": calibration_digest(calib),
        }
        if self.partial.exists() and self.config.resume:
            self._publish_if_finished()
            self._reopen(identity)
        else:
            if self.partial.exists():
                if not self.overwrite:
                    raise OutputError(
                        f"an interrupted run left {self.partial}; pass --resume to continue it, or --overwrite "
                        "to start over"
                    )
                shutil.rmtree(self.partial)
            elif self.config.resume:
                log.warning("nothing to resume in %s: starting from block 0", self.partial)
            self._fresh(identity)
        self.source.load_stem(self.model)

    def _fresh(self, identity: dict[str, Any]) -> None:
        (self.partial / "acts").mkdir(parents=True)
        room = header_room(self.checkpoint.tensors) * 2
        self.writer = ShardWriter(self.partial, room, MAX_SHARD_BYTES)
        self.store = self._new_store(self.partial / "acts")
        for key in self.source.outside_keys():  # tensors no block owns: copied shard to shard
            value = self.checkpoint.read([key])[key]
            name = next((n for n, k in self.source.keys.items() if k == key), None)
            self.writer.add(key, value.to(self._param_dtype[name]) if name is not None else value)
        self.progress = {"version": 1, **identity, "room": room, "next_block": 0, "layers": [], "skipped": []}
        self.progress["world_size"] = self.world

    def _publish_if_finished(self) -> None:
        """Publish a partial folder whose finish was interrupted after its last check, and say so (an error).

        The finish removes ``progress.json`` only once the shards are verified and the report is
        written: a folder in that state is complete and only has to be renamed into place.
        """
        if (self.partial / PROGRESS_FILE).exists() or not (self.partial / REPORT_FILE).exists():
            return
        self._publish()
        raise OutputError(f"the interrupted run had finished and verified its output: it is now in {self.out}")

    def _reopen(self, identity: dict[str, Any]) -> None:
        path = self.partial / PROGRESS_FILE
        if not path.exists():
            raise OutputError(
                f"{self.partial} has no {PROGRESS_FILE}; it cannot be resumed: delete it or pass --overwrite"
            )
        progress = json.loads(path.read_text())
        for what, label in (
            ("checkpoint", "the checkpoint's shards changed"),
            ("calibration", "the calibration tokens differ"),
        ):
            if progress.get(what) != identity[what]:
                raise OutputError(f"cannot resume {self.partial}: {label}; rerun with --overwrite to start over")
        if progress.get("config") != identity["config"]:
            changed = sorted(
                k
                for k in set(identity["config"]) | set(progress["config"])
                if identity["config"].get(k) != progress["config"].get(k)
            )
            raise OutputError(
                f"cannot resume {self.partial}: the configuration changed ({', '.join(changed)}); use the "
                "original options, or --overwrite to start over"
            )
        if int(progress.get("world_size", 1)) != self.world:
            raise OutputError(
                f"cannot resume {self.partial}: it ran on {progress.get('world_size', 1)} processes, this run has "
                f"{self.world} (each keeps its share of the activations); resume with the same number, or "
                "--overwrite to start over"
            )
        self.progress = progress
        self.prior_seconds = float(progress.get("elapsed", 0.0))
        self.writer = ShardWriter(self.partial, int(progress["room"]), MAX_SHARD_BYTES, state=progress["writer"])
        self.store = self._new_store(self.partial / "acts", progress["store"])
        log.info("resuming %s from block %d", self.partial, progress["next_block"])

    def _activation_dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.dtype.is_floating_point)

    def _new_store(self, folder: Path, state: dict[str, Any] | None = None) -> DiskStore:
        return DiskStore(folder, self._activation_dtype(), state=state, memory_budget=self._activation_budget)

    # -- writing behind the sweep -------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on a background thread once the previous one is done (its error raised here)."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # handed to the sweep's thread by the next wait()
                self._job_error = exc

        self._job = threading.Thread(target=run, name="oneshot-writer", daemon=False)
        self._job.start()

    def wait(self, raise_error: bool = True) -> None:
        """Wait for the block being written behind the sweep; raise its error (or only log it)."""
        if self._job is not None:
            self._job.join()
            self._job = None
        error, self._job_error = self._job_error, None
        if error is not None:
            if raise_error:
                raise error
            log.error("writing the last finished block failed: %s", error)

    # -- during the sweep ---------------------------------------------------------------------

    @property
    def start(self) -> int:
        """The first block this run prunes (0, or where a resumed run left off)."""
        return int(self.progress.get("next_block", 0))

    def io(self, result: SweepResult | None = None) -> SweepIO:
        """Sweep plumbing for the pruning sweep: blocks from the shards, each written as it finishes."""
        assert self.store is not None
        if not self.writes:
            return SweepIO(
                source=self.source,
                store=self.store,
                start=self.start,
                after_block=self._record_reader,
                scratch=self.scratch,
            )

        def after_block(index: int, block: nn.Module) -> None:
            """Write the block, its outputs and the progress record; behind the sweep when the store is in memory.

            Everything the job needs is taken now, on the sweep's thread (the block's tensors, the
            records, the store's state and pending outputs); the job alone touches the writer and
            the progress record until :meth:`wait`.
            """
            assert self.store is not None
            tensors, quantized = self._write_block(index, block, result.quantized if result is not None else {})
            update: dict[str, Any] = {"next_block": index + 1}
            if result is not None:
                update["layers"] = [dataclasses.asdict(r) for r in result.layers]
                update["skipped"] = list(result.skipped)
                update["refits"] = [dataclasses.asdict(r) for r in result.refits]
                update["times"] = dataclasses.asdict(result.times)
            update["elapsed"] = self.prior_seconds + time.perf_counter() - self.t0
            store_state, write_outputs = self.store.state(), self.store.take_pending()

            def job() -> None:
                assert self.writer is not None
                for key, tensor in tensors:
                    self.writer.add(key, tensor)
                write_outputs()
                if quantized:
                    self.progress.setdefault("quantized", []).extend(quantized)
                self.progress.update(update)
                self.save_progress(store_state)

            if self.ranks is not None:  # every rank's activations durable before the record names the next block
                with guarded(self.ranks, "recording each rank's activations"):
                    pass
                self.wait()
                job()
            elif self.store.in_memory:
                self._submit(job)  # the next block computes while this one is written
            else:  # the next block writes into the file the last record points at: not before it is replaced
                self.wait()
                job()

        if self.start == 0:
            self.save_progress()
        return SweepIO(
            source=self.source, store=self.store, start=self.start, after_block=after_block, scratch=self.partial
        )

    def _record_reader(self, index: int, block: nn.Module) -> None:
        """A reading rank after block ``index``: its next inputs flushed and their state recorded (the last
        two kept: rank 0's record may still name this block), before rank 0 records the next block."""
        assert self.store is not None and self.scratch is not None and self.ranks is not None
        with guarded(self.ranks, "recording each rank's activations"):
            self.store.take_pending()()
            path = self.scratch / RANK_STATE
            states = json.loads(path.read_text())["states"] if path.exists() else {}
            states = {k: v for k, v in states.items() if int(k) == index} | {str(index + 1): self.store.state()}
            replace_durably(path, json.dumps({"states": states}))

    def read_only_io(self, name: str) -> SweepIO:
        """Sweep plumbing for a statistics-only sweep (OWL): blocks streamed, nothing written."""
        folder = (self.partial if self.scratch is None else self.scratch) / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return SweepIO(source=self.source, store=DiskStore(folder, self._activation_dtype()), scratch=folder)

    def restore(self, result: SweepResult) -> None:
        """Put the records of blocks finished before a resume into ``result``."""
        for record in self.progress.get("layers", []):
            result.layers.append(LayerRecord(**{**record, "shape": tuple(record["shape"])}))
        result.skipped.extend(self.progress.get("skipped", []))
        result.refits.extend(RefitRecord(**record) for record in self.progress.get("refits", []))
        for name, value in self.progress.get("times", {}).items():  # the phases of the blocks done before
            setattr(result.times, name, list(value) if name == "per_block" else float(value))

    def _write_block(
        self, index: int, block: nn.Module, quantized: dict[str, QuantizedLayer]
    ) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
        """The block's tensors to write, by checkpoint key, and its quantized layers' names.

        A quantized layer is checked here and written in its compressed form (then dropped from
        ``quantized``); the tensors stay referenced until written, after the block is released.
        """
        prefix = self.source.block_prefix(index)
        modules = modules_and_layers(block)
        mine = [n for n in quantized if n.startswith(prefix)]
        expert_keys = expert_weight_keys(self.model, mine)
        compressed = set()
        tensors: list[tuple[str, torch.Tensor]] = []
        names: list[str] = []
        for name in mine:
            layer = quantized.pop(name)
            check_layer(name, layer, weight_of(modules[name[len(prefix) :]]))
            weight_key = expert_keys.get(name) or self.source.keys.get(f"{name}.weight", f"{name}.weight")
            tensors.extend(
                (weight_key.removesuffix("weight") + suffix, tensor) for suffix, tensor in layer.tensors.items()
            )
            compressed.add(weight_key)
            names.append(name)
        for name, param in block.named_parameters():
            tensors.extend(kv for kv in self.source.saved_tensors(prefix + name, param.data) if kv[0] not in compressed)
        return tensors, names

    def save_progress(self, store_state: dict[str, Any] | None = None) -> None:
        """Flush shards and activations, then replace ``progress.json`` atomically.

        ``store_state`` is the activation store's state when the block finished (the sweep may
        have moved on while this block was written behind it).
        """
        assert self.writer is not None and self.store is not None
        self.writer.flush()
        self.store.sync()
        self.progress["writer"] = self.writer.state()
        self.progress["store"] = store_state if store_state is not None else self.store.state()
        replace_durably(self.partial / PROGRESS_FILE, json.dumps(self.progress))

    # -- finishing ----------------------------------------------------------------------------

    def discard(self) -> None:
        """Remove the partial folder (a run that cannot be resumed leaves nothing behind)."""
        self.wait(raise_error=False)
        if self.writes:
            shutil.rmtree(self.partial, ignore_errors=True)

    def close(self, keep: bool = False) -> None:
        """Finish writing behind (errors only logged), remove a reading rank's folder (``keep``: for a resume)."""
        self.wait(raise_error=False)
        if self.scratch is not None and not keep:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def _publish(self) -> None:
        """Remove the activation files (acts/, owl/) and rename the finished folder into place."""
        for scratch in self.partial.iterdir():
            if scratch.is_dir():
                shutil.rmtree(scratch)
        publish(self.partial, self.out, self.overwrite)

    @property
    def resumable(self) -> bool:
        """Whether the partial folder can be continued with ``--resume`` (it has its progress record; a
        reading rank: its activations' record)."""
        if not self.writes:
            return self.scratch is not None and (self.scratch / RANK_STATE).exists()
        return (self.partial / PROGRESS_FILE).exists()

    def _write_metadata(self, tokenizer: Any) -> None:
        """The model config (with a quantized run's ``quantization_config``), generation config and tokenizer."""
        model_config: Any = self.model.config
        model_config.save_pretrained(self.partial)
        quantized = set(self.progress.get("quantized", []))
        if quantized:
            add_quantization_config(
                self.partial, self.config.quant_spec(), unquantized_linears(self.model, dict.fromkeys(quantized))
            )
        generation = self.folder / "generation_config.json"
        if generation.exists():
            shutil.copy2(generation, self.partial / generation.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.partial)

    def finish(
        self, tokenizer: Any, report: dict[str, Any], config: dict[str, Any], recipe: dict[str, Any] | None = None
    ) -> int:
        """Name and index the shards, add config, tokenizer and report, verify, rename into place.

        Returns the number of tensor bytes verified.
        """
        self.wait()  # the last block, written behind the sweep
        assert self.writer is not None
        digests = dict(self.writer.digests)
        # Crash-safe order: every step up to the report can be redone by --resume (progress.json stays,
        # and records the shards' closing); the progress record goes once the folder is verified and
        # complete, and a resume that finds a folder in that state only publishes it.
        if not self.progress.get("finishing"):
            self.writer.close_shard()
            self.progress["finishing"] = True
            self.save_progress()
        self.writer.finish()
        self._write_metadata(tokenizer)
        try:
            verified = verify_shards(self.partial, digests)
        except OutputError:
            (self.partial / PROGRESS_FILE).unlink()  # the shards on disk are not what was written: no resume
            raise
        write_run_files(self.partial, {**report, "verified_bytes": verified}, config, recipe)
        fsync_path(self.partial / REPORT_FILE)
        (self.partial / PROGRESS_FILE).unlink()
        fsync_path(self.partial)
        self._publish()
        return verified
