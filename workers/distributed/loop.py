"""What every Ray Train worker runs: DDP training against replicas of the dictionaries kept
by the dictionary actor (docs/architecture.md, "A training step").

Each step, on every rank: a batch from the rank's `ClipReader`, device transforms seeded by
(seed, rank, step), `train_step` (the per-step math of the single-process trainer, with the
query encoders in DDP). Then the global batch's keys, queries and clip ids are gathered and
rank 0 sends them to the actor without waiting; the deltas due at this step (see
`replicas`) are broadcast and applied on every rank. A checkpoint is written every
`checkpoint.every_steps`, at the end and on a stop request. What in a step waits for the
device, and what no longer does: docs/architecture.md, "A training step".
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service import config as config_module
from service import storage
from service.config import Config
from service.errors import ActorError
from workers.actor import Delta, DictionaryClient
from workers.data.reader import ClipReader, training_reader
from workers.data.transforms import Transforms, build_transforms, step_generator
from workers.diagnostics import step_statistics
from workers.distributed import collectives
from workers.distributed.checkpoint import load_checkpoint, save_checkpoint
from workers.distributed.crashes import ReadingNote, collect_notes, record_crash, repeated_crash
from workers.distributed.faults import Faults
from workers.distributed.replicas import DeltaSchedule, Replicas, build_replicas
from workers.metrics import MetricsLog, NullMetricsLog
from workers.tensors import to_numpy
from workers.trainer import (
    NonFiniteLossError,
    StepOutput,
    TrainState,
    autocast_dtype,
    build_train_state,
    check_finite,
    host_values,
    step_metrics,
    use_channels_last,
)
from workers.trainer import train_step as method_step

PROGRESS_EVERY_S = 0.5  # how often rank 0 tells the actor its step, for the driver's progress bar


@dataclass(kw_only=True)
class RunContext:
    """What a worker needs besides the config: where data and the run folder are."""

    run_id: str
    data_uri: str
    run_uri: str
    actor_name: str  # the dictionary actor this driver created for the run
    endpoint_url: str = ""
    split: str | None = None  # the data set's split to train on (None: every clip)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(kw_only=True)
class Worker:
    """Everything one rank trains with. `schedule` exists on rank 0 only."""

    cfg: Config
    run: RunContext
    rank: int
    device: torch.device
    reader: ClipReader
    transforms: Transforms
    state: TrainState
    replicas: Replicas
    schedule: DeltaSchedule | None
    log: NullMetricsLog
    faults: Faults
    note: ReadingNote  # where this rank is reading, left behind if the process dies
    repeated_crash: str = ""  # the previous two attempts died at the same place: the run ends
    staged: HostCopy | None = None  # rank 0: the newest global batch on its way to the host, not submitted yet
    unchecked: StepOutput | None = None  # the newest step whose finiteness was not read yet

    def close(self) -> None:
        self.reader.close()
        self.note.close()
        self.log.close()


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The function every Ray Train worker runs. Returns the outcome (rank 0's reaches the
    driver as `Result.return_value`): `state` (succeeded, stopped or failed), `step`,
    `metrics` of the last step, `error`."""
    cfg = config_module.from_dict(loop_config["config"])
    worker = build_worker(cfg, RunContext(**loop_config["run"]))
    try:
        if worker.repeated_crash:
            return _failed(worker.state.step, {}, worker.repeated_crash)
        return run_steps(worker)
    except BaseException as err:
        worker.note.raised(err)
        raise
    finally:
        worker.close()


# --- builders -------------------------------------------------------------------------------


def build_device(cfg: Config) -> torch.device:
    if cfg.resources.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def build_reader(cfg: Config, run: RunContext, *, rank: int, world_size: int, note: Any = None) -> ClipReader:
    return training_reader(
        cfg,
        uri=run.data_uri,
        rank=rank,
        world_size=world_size,
        split=run.split,
        endpoint_url=run.endpoint_url,
        note=note,
    )


def build_worker(cfg: Config, run: RunContext) -> Worker:
    """This rank's reader, transforms, state, replicas and (rank 0) actor schedule, restored
    from the run's newest checkpoint when Ray Train hands one over."""
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    storage.set_retry_budget(cfg.storage.retry_budget_s)
    device = build_device(cfg)
    torch.set_num_threads(max(1, cfg.resources.cpus_per_worker))
    faults = Faults.from_env()
    repeated = look_at_crashes(run, rank)  # before this rank's own note exists
    note = ReadingNote(run.run_uri, rank)
    try:
        reader = build_reader(cfg, run, rank=rank, world_size=world_size, note=faults.reader_note(note))
        state = build_train_state(cfg, device=device)
        replicas = build_replicas(cfg, device=device)
        schedule = None
        if rank == 0:
            client = DictionaryClient.connect(run.actor_name, timeout_s=cfg.resources.actor_timeout_s)
            schedule = DeltaSchedule(
                client=client, max_staleness=cfg.method.max_staleness, max_restarts=cfg.resources.max_actor_restarts
            )

        checkpoint = ray.train.get_checkpoint()
        restored = load_checkpoint(checkpoint) if checkpoint is not None else None
        if restored is not None:
            state.load_state_dict(restored.train)
            replicas.load_state_dict(restored.replicas)
            reader.load_state_dict(restored.readers)
        if schedule is not None:
            schedule.start(
                actor_state=restored.actor if restored else None,
                pending_steps=restored.pending_steps if restored else [],
                replica_version=replicas.version,
            )
        if world_size > 1:
            state.query = torch.nn.parallel.DistributedDataParallel(
                state.query, device_ids=[device.index] if device.type == "cuda" else None
            )
        return Worker(
            cfg=cfg,
            run=run,
            rank=rank,
            device=device,
            reader=reader,
            transforms=build_transforms(cfg, device=device),
            state=state,
            replicas=replicas,
            schedule=schedule,
            log=MetricsLog(run_uri=run.run_uri, endpoint_url=run.endpoint_url) if rank == 0 else NullMetricsLog(),
            faults=faults,
            note=note,
            repeated_crash=repeated,
        )
    except BaseException as err:  # a Python error: Ray Train reports it; not a crash to blame on rows
        note.raised(err)
        note.close()
        raise


def look_at_crashes(run: RunContext, rank: int) -> str:
    """Every rank collects the notes dead ranks of this run left on its node; rank 0 shows
    them, adds them to the run's crash history and judges it. The error that ends the run
    when the last two crashes happened at the same place, on every rank ("" otherwise)."""
    notes = [note for found in collectives.gather_objects(collect_notes(run.run_uri)) for note in found]
    verdict = ""
    if rank == 0 and notes:
        for note in notes:
            rows = ", ".join(f"{shard} row {row} (clip {clip})" for shard, row, clip in note["rows"]) or "none"
            say(f"cmacc: rank {note['rank']} of the previous attempt died at step {note['step']}; decoding: {rows}")
            if note.get("fatal_report"):
                say(note["fatal_report"])
        verdict = repeated_crash(record_crash(run.run_uri, notes, endpoint_url=run.endpoint_url))
    return collectives.broadcast_from_rank0(verdict)


# --- the loop -------------------------------------------------------------------------------


def run_steps(w: Worker) -> dict[str, Any]:
    """Steps until `train.steps`, a stop request or a non-finite loss; returns the outcome.

    A step waits for the device only where the method needs it: with `max_staleness = 0`,
    for the copy of the global batch the actor selects from before the next step (rank 0).
    Loss values and finiteness stay on the device and are read when the metrics are written
    (every `train.log_every` steps, at checkpoints and at the end) or a step later."""
    cfg, state = w.cfg, w.state
    total = cfg.train.steps
    batches = iter(w.reader)
    start_step = state.step
    state.query.train()
    state.key.train()
    last_log = last_progress = time.perf_counter()
    metrics: dict[str, float] = {}
    pending = PendingMetrics(w.log)
    stop = False

    def failed(at: int, error: str) -> dict[str, Any]:  # the steps logged so far are written first
        pending.flush()
        return _failed(at, metrics, error)

    while state.step < total and not stop:
        step = state.step
        w.note.at_step(step)
        w.faults.before_step(step, w.rank, w.schedule.client if w.schedule else None)
        started = time.perf_counter()
        batch = w.transforms(next(batches), device=w.device, generator=step_generator(cfg.train.seed, w.rank, step))
        loaded = time.perf_counter()
        try:
            out = train_step(w, batch)
        except NonFiniteLossError as err:
            return failed(step, str(err))
        log_due = state.step % cfg.train.log_every == 0 or state.step >= total
        flush = log_due or state.step % cfg.checkpoint.every_steps == 0
        exchanged = exchange_with_actor(w, out, batch, flush=flush)
        if exchanged.error:
            return failed(state.step, exchanged.error)
        stop = (
            exchanged.stop_requested or state.step == w.faults.stop_step or _preempted(state.step, cfg.train.log_every)
        )
        # Finiteness: the previous step's now (its results reached the host with this
        # exchange, so reading it waits for nothing), this step's too before any checkpoint.
        unchecked = [o for o in (w.unchecked, out) if o is not None]
        w.unchecked = None if flush or stop else unchecked.pop()
        try:
            for done in unchecked:
                check_finite(done)
        except NonFiniteLossError as err:
            return failed(done.step, str(err))
        step_done = time.perf_counter()
        step_ended_at = time.time()
        step_record = step_metrics(out, num_clips=exchanged.num_clips, compute_s=step_done - loaded)
        step_record.update(data_metrics(w, wait_s=loaded - started))
        step_record.update(actor_metrics(w, exchanged))
        at_end = state.step >= total or stop
        log_due = log_due or at_end
        checkpoint_due = at_end or state.step % cfg.checkpoint.every_steps == 0
        digests = dict(exchanged.digests)
        actor_state = None
        if checkpoint_due:
            actor_state, error = fetch_actor_state(w, digests)
            if error:
                return failed(state.step, error)
        for record_step, digest in digests.items():
            if record_step == state.step:
                step_record["data/batch_digest"] = digest
            else:
                pending.patch(record_step, {"data/batch_digest": digest})
        if w.schedule is not None and log_due:
            step_record.update(measured(w, exchanged, step))
        if step == start_step:  # marks where each attempt began: the steps a failure cost
            step_record["run/start_step"] = float(start_step)
        if at_end:
            step_record.update(final_checks(w, actor_state))
            if stop:
                step_record["stopped"] = 1.0
        pending.add(state.step, step_record, at=step_ended_at)
        if log_due or checkpoint_due:
            metrics = pending.flush()
        if w.schedule is not None and (at_end or time.perf_counter() - last_progress >= PROGRESS_EVERY_S):
            w.schedule.client.report_progress(_progress(state.step, total, metrics, step_record))
            last_progress = time.perf_counter()
        if w.rank == 0 and log_due:
            rate = cfg.train.log_every if state.step % cfg.train.log_every == 0 else 1
            say(progress_line(state.step, total, metrics, rate / max(time.perf_counter() - last_log, 1e-9)))
            last_log = time.perf_counter()
        if checkpoint_due:
            w.log.sync()
            save_checkpoint(
                cfg=cfg,
                run_id=w.run.run_id,
                state=state,
                reader=w.reader,
                replicas=w.replicas,
                schedule=w.schedule,
                actor_state=actor_state,
                metrics=metrics,
            )
    return {"state": "stopped" if stop else "succeeded", "step": state.step, "metrics": metrics, "error": ""}


class PendingMetrics:
    """Steps' metrics not written yet, with their loss values still on the device: `flush`
    reads them all in one host copy, writes each step's record (timed when the step ended)
    and returns the newest record."""

    def __init__(self, log: NullMetricsLog):
        self.log = log
        self.records: list[tuple[int, dict[str, Any], float]] = []

    def add(self, step: int, record: dict[str, Any], *, at: float) -> None:
        self.records.append((step, record, at))

    def patch(self, step: int, values: dict[str, Any]) -> None:
        """Add `values` to the pending record of `step` (none there: nothing to add to)."""
        for pending_step, record, _ in reversed(self.records):
            if pending_step == step:
                record.update(values)
                return

    def flush(self) -> dict[str, float]:
        if not self.records:
            return {}
        resolved = host_values([record for _, record, _ in self.records])
        for (step, _, at), record in zip(self.records, resolved, strict=True):
            self.log.log(step, record, at=at)
        self.records.clear()
        return resolved[-1]


def _failed(step: int, metrics: dict[str, float], error: str) -> dict[str, Any]:
    """The outcome of a run that every rank ends at once, without an exception Ray Train would
    retry: a non-finite loss, or a dictionary actor that could not be recovered (training on
    without dictionary updates would be another method)."""
    message = f"{error}; the last good checkpoint is kept"
    say(f"cmacc: error: {message}")
    return {"state": "failed", "step": step, "metrics": metrics, "error": message}


def fetch_actor_state(w: Worker, digests: dict[int, float]) -> tuple[dict[str, Any] | None, str]:
    """The actor's state for a checkpoint (rank 0; None elsewhere), after the staged batch
    (a stop between flushes leaves one) is submitted, its digest added to `digests`; and, on
    every rank, the error that ends the run when the actor cannot give it ("" when it did)."""
    actor_state, error = None, ""
    if w.schedule is not None:
        try:
            digests.update(submit_staged(w))
            actor_state = w.schedule.actor_state(w.replicas)
        except ActorError as err:
            error = str(err)
    return actor_state, collectives.broadcast_from_rank0(error)


def train_step(w: Worker, batch: dict[str, Any]) -> StepOutput:
    """The method's step on this rank's batch, against this rank's replicas. A non-finite
    loss changes nothing on any rank; with a fused optimiser the verdict stays on the device
    (the loop reads it with `check_finite` after the exchange), else every rank stops
    together inside the step."""
    if w.state.step == w.faults.nan_step:
        batch["video"] = batch["video"] * float("nan")
    return method_step(
        w.state,
        batch,
        dictionary_v=w.replicas.dictionary_v,
        dictionary_a=w.replicas.dictionary_a,
        method=w.cfg.method,
        grad_clip=w.cfg.optim.grad_clip,
        amp_dtype=autocast_dtype(w.cfg.train.precision, w.device),
        channels_last=use_channels_last(w.cfg.train, w.device),
        all_finite=lambda ok: collectives.all_ranks_true(ok, w.device),
        all_finite_on_device=collectives.all_ranks_true_on_device,
        defer_check=True,
    )


@dataclass(kw_only=True)
class Exchanged:
    """What a step's exchange with the actor gave every rank."""

    stop_requested: bool
    clip_ids: torch.Tensor  # M: the global batch's clip ids
    labels: torch.Tensor  # M: their labels (-1 when unknown)
    gathered: dict[str, torch.Tensor]  # the global batch's queries_v, queries_a, keys_v, keys_a [M, d]
    deltas: list[Delta]  # the deltas applied now
    digests: dict[int, float] = field(default_factory=dict)  # rank 0: {step record: batch digest} submitted now
    error: str = ""  # the actor failed for good: the run ends

    @property
    def num_clips(self) -> int:
        return int(self.clip_ids.shape[0])


class HostCopy:
    """A step's global batch on its way to the host for the actor: on CUDA copied into pinned
    memory without waiting, with an event to wait on when it is submitted (by then, usually,
    long done); on the CPU the tensors themselves."""

    def __init__(self, step: int, tensors: dict[str, torch.Tensor]):
        self.step = step  # the step whose batch this is
        self.event = None
        self.tensors = dict(tensors)
        if any(t.is_cuda for t in tensors.values()):
            self.tensors = {}
            for name, tensor in tensors.items():
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                self.tensors[name] = host
            self.event = torch.cuda.Event()
            self.event.record()

    def arrays(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return {name: to_numpy(tensor) for name, tensor in self.tensors.items()}


def submit_staged(w: Worker) -> dict[int, float]:
    """Rank 0: submit the staged batch to the actor; returns {its step's record: the batch's
    digest} (nothing when none is staged)."""
    if w.staged is None or w.schedule is None:
        return {}
    staged, w.staged = w.staged, None
    arrays = staged.arrays()
    w.schedule.submit(staged.step, arrays)
    # the global batch's clip ids, condensed: resumed and uninterrupted runs must agree
    return {staged.step + 1: float(zlib.crc32(arrays["clip_ids"].tobytes()))}


def exchange_with_actor(w: Worker, out: StepOutput, batch: dict[str, Any], *, flush: bool) -> Exchanged:
    """Gather the global batch, send it to the actor (rank 0) and apply the deltas due now
    on every rank.

    With `method.max_staleness` >= 1 the deltas due now are of batches at least one step
    older, so rank 0 stages this batch (its copy to the host runs without waiting) and
    submits it at the next step; with `flush` (log steps, checkpoints, the end) or
    `max_staleness = 0` it submits it now. Either way the actor sees every batch in step
    order, so the run does not depend on when the copies finish."""
    gathered = {
        name: collectives.gather_rows(getattr(out, name)) for name in ("queries_v", "queries_a", "keys_v", "keys_a")
    }
    clip_ids = collectives.gather_rows(batch["index"])
    labels = collectives.gather_rows(batch["label"])
    control: dict[str, Any] = {"deltas": [], "stop": False, "error": ""}
    digests: dict[int, float] = {}
    if w.schedule is not None:
        try:
            digests.update(submit_staged(w))  # the previous step's batch
            w.staged = HostCopy(w.state.step - 1, {**gathered, "clip_ids": clip_ids, "labels": labels})
            if flush or w.cfg.method.max_staleness == 0:
                digests.update(submit_staged(w))
            final = w.state.step >= w.cfg.train.steps
            control["deltas"] = w.schedule.due(w.state.step, w.replicas, drain=final)
        except ActorError as err:  # what the schedule could not recover from
            control["error"] = str(err)
        control["stop"] = any(delta.stop_requested for delta in control["deltas"])
    control = collectives.broadcast_from_rank0(control)
    if control["error"]:
        return Exchanged(
            stop_requested=True,
            clip_ids=clip_ids,
            labels=labels,
            gathered=gathered,
            deltas=[],
            digests=digests,
            error=control["error"],
        )
    for delta in control["deltas"]:
        w.replicas.apply(delta)
    return Exchanged(
        stop_requested=control["stop"],
        clip_ids=clip_ids,
        labels=labels,
        gathered=gathered,
        deltas=control["deltas"],
        digests=digests,
    )


# --- metrics and checks -----------------------------------------------------------------------


def data_metrics(w: Worker, *, wait_s: float) -> dict[str, float]:
    """`data/batch_digest` joins the record when rank 0 submits the batch (`submit_staged`)."""
    return {
        "data/wait_s": wait_s,
        "data/skipped": float(w.reader.num_skipped),
        "storage/retries": float(sum(storage.RETRIES.values())),  # this rank's process, since it started
    }


def actor_metrics(w: Worker, exchanged: Exchanged) -> dict[str, float]:
    """Rank 0's view of the actor, every step: selection time, staleness, restarts."""
    if w.schedule is None:
        return {}
    select_ms = [delta.select_ms for delta in exchanged.deltas]
    return {
        "dict/select_ms": float(np.mean(select_ms)) if select_ms else float("nan"),
        "dict/staleness": float(len(w.schedule.pending)),
        "dict/version": float(w.replicas.version),
        "dict/wait_s": w.schedule.wait_s,
        "dict/actor_restarts": float(w.schedule.actor_restarts),
    }


def measured(w: Worker, exchanged: Exchanged, step: int) -> dict[str, float]:
    """Rank 0's statistics every `train.log_every` steps: the global batch's embeddings
    (collapse, correspondence), what the replicas of the dictionaries hold, and the fraction
    of arrivals that entered through the deltas applied now."""
    return step_statistics(
        **exchanged.gathered,
        labels=exchanged.labels,
        dictionary_v=w.replicas.dictionary_v,
        dictionary_a=w.replicas.dictionary_a,
        step=step,
        arrived=float(exchanged.clip_ids.shape[0] * len(exchanged.deltas)),
        entered_v=float(sum(len(delta.entered_v.slots) for delta in exchanged.deltas)),
        entered_a=float(sum(len(delta.entered_a.slots) for delta in exchanged.deltas)),
    )


def final_checks(w: Worker, actor: dict[str, Any] | None) -> dict[str, float]:
    """At the end: are all replicas identical to each other and to the actor, at its version?"""
    import ray

    mine = torch.tensor([w.replicas.checksum(), float(w.replicas.version)], device=w.device, dtype=torch.float64)
    everyone = collectives.gather_rows(mine[None])  # W x 2
    nodes = collectives.gather_objects(ray.get_runtime_context().get_node_id())
    result = {
        "dict/replicas_agree": float(bool((everyone == everyone[0]).all())),
        "cluster/num_nodes": float(len(set(nodes))),
    }
    if actor is not None:  # rank 0
        same = actor["version"] == w.replicas.version and all(
            torch.equal(
                torch.as_tensor(actor["dictionaries"][f"dictionary_{m}"]["keys"], device=w.device),
                getattr(w.replicas, f"dictionary_{m}").keys,
            )
            for m in "va"
        )
        result["dict/replicas_match_actor"] = float(same)
        result["dict/actor_version"] = float(actor["version"])
    return result


def _preempted(step: int, every: int) -> bool:
    """A preemption notice for any worker's node; asked every `every` steps by all ranks,
    because Ray Train answers it with a barrier over the worker group."""
    import ray.train

    return step % every == 0 and ray.train.get_preemption_info() is not None


def _progress(step: int, total: int, written: dict[str, float], now: dict[str, Any]) -> dict[str, float]:
    """For the driver's display: the step now, the loss as of the last written metrics (NaN
    before the first), the clips/s now."""
    return {
        "step": step,
        "total": total,
        "loss": written.get("train/loss", math.nan),
        "clips_per_s": now["train/clips_per_s"],
    }


def say(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver. Not `print`: inside a
    Ray Train worker, print is patched to go both to stdout and to Train's logger, and the
    driver then shows every line twice."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def progress_line(step: int, total: int, metrics: dict[str, float], steps_per_s: float) -> str:
    eta = (total - step) / steps_per_s if steps_per_s > 0 else math.inf
    parts = [
        f"step {step}/{total}",
        f"loss {metrics['train/loss']:.4f}",
        f"clips/s {metrics['train/clips_per_s']:.1f}",
    ]
    if "dict/select_ms" in metrics and math.isfinite(metrics["dict/select_ms"]):
        parts.append(f"select {metrics['dict/select_ms']:.1f} ms")
    if "dict/staleness" in metrics:
        parts.append(f"stale {metrics['dict/staleness']:.0f}")
    if "embed/cos_qv" in metrics:  # collapse shows here: cosines near 1, no positive-negative gap
        parts.append(f"q cos v/a {metrics['embed/cos_qv']:.2f}/{metrics['embed/cos_qa']:.2f}")
        gap = metrics["embed/pos_cos_va"] - metrics["embed/neg_cos_va"]
        parts.append(f"pos-neg {gap:+.2f}")
    parts.append(f"eta {eta:.0f} s")
    return "  ".join(parts)
