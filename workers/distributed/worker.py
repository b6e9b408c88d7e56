"""One Ray Train worker's trainer: everything a rank trains with, and the builders that make
it (docs/architecture.md, "A training step").

`build_worker` makes the rank's readers (the training stream and, with the fresh candidate
pool, the extra clips' stream), transforms, train state, dictionary exchange (its replicas
and, on rank 0, the schedule of the actor's deltas), checkpointer and metrics logger, and
restores them from the checkpoint Ray Train hands over. `Worker.next_batch` and
`Worker.step` are what the loop calls each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from service import config as config_module
from service.config import Config
from service.errors import DataError
from workers.actor import DictionaryClient
from workers.data.decode import CorruptClipError
from workers.data.prefetch import BatchPrefetcher, CursorAt, pinned
from workers.data.reader import ClipReader, training_reader
from workers.data.transforms import Transforms, build_transforms, step_generator
from workers.diagnostics import step_statistics
from workers.distributed import collectives
from workers.distributed.checkpoint import Checkpointer, load_checkpoint
from workers.distributed.crashes import ReadingNote, collect_notes, record_crash, repeated_crash
from workers.distributed.exchange import ActorExchange
from workers.distributed.faults import Faults
from workers.distributed.metrics_logger import MetricsLogger, say
from workers.distributed.replicas import DeltaSchedule, Replicas, build_replicas
from workers.metrics import MetricsLog, NullMetricsLog, open_run_trackers
from workers.step import StepOutput, train_step
from workers.tensors import to_torch
from workers.trackers import Tracker
from workers.training import TrainState, autocast_dtype, build_train_state, use_channels_last

EXTRA_STREAM = 1  # the reader stream of the fresh pool's extra clips
EXTRA_SEED_TAG = 7919  # keeps the extra clips' augmentations apart from the batch's


@dataclass(kw_only=True)
class RunContext:
    """What a worker needs besides the config: where data and the run folder are."""

    run_id: str
    data_uri: str
    run_uri: str
    actor_name: str  # the dictionary actor this driver created for the run
    endpoint_url: str = ""
    split: str | None = None  # the data set's split to train on (None: every clip)
    verbose: bool = False  # Ray Train's own INFO messages on the console too

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(kw_only=True)
class Worker:
    """Everything one rank trains with."""

    cfg: Config
    run: RunContext
    rank: int
    world_size: int
    device: torch.device
    reader: ClipReader
    extra_reader: ClipReader | None  # the fresh pool's extra clips (None without them)
    transforms: Transforms
    state: TrainState
    exchange: ActorExchange
    checkpointer: Checkpointer
    logger: MetricsLogger
    faults: Faults
    note: ReadingNote  # where this rank is reading, left behind if the process dies
    repeated_crash: str = ""  # the previous two attempts died at the same place: the run ends
    start_step: int = 0  # the step this attempt started from
    unchecked: StepOutput | None = None  # the newest step whose finiteness was not read yet
    preemption_seen: bool = False  # a preemption notice was answered with a checkpoint
    nodes: list[str] = field(default_factory=list)  # each rank's node, "id (ip)"
    resumed_checks: dict[str, float] = field(default_factory=dict)  # `resumed_checks` of a resumed attempt
    batches: BatchPrefetcher | None = None  # the next step's batch, prepared while this one runs (on CUDA)
    cursor: CursorAt | None = None  # the training reader's cursor after the newest batch handed to a step
    extra_cursor: CursorAt | None = None  # the same for the fresh pool's reader

    def next_batch(self, step: int) -> dict[str, Any]:
        """This rank's batch of `step` on the device, augmented with the generator of (seed,
        rank, step); with the fresh pool its extra clips under `extra`, augmented apart. On
        CUDA it was prepared while the previous step ran (`workers.data.prefetch`)."""
        if self.batches is None:
            self.batches = BatchPrefetcher(self.prepare_batch, device=self.device, start_step=step)
        batch, self.cursor, self.extra_cursor = self.batches.get(step)
        return batch

    def prepare_batch(self, step: int) -> tuple[dict[str, Any], CursorAt, CursorAt | None]:
        """The batch of `step` with the readers' cursors right after it (what a checkpoint
        after this step saves, however far the prefetch has read since)."""
        seed = self.cfg.train.seed
        raw = next(self.reader)
        cursor = CursorAt(self.reader)
        self.faults.log_clips(
            step=step, rank=self.rank, world_size=self.world_size, start_step=self.start_step, batch=raw
        )
        batch = self.to_device(raw, step_generator(seed, self.rank, step))
        extra_cursor = None
        if self.extra_reader is not None:
            raw_extra = next(self.extra_reader)
            extra_cursor = CursorAt(self.extra_reader)
            batch["extra"] = self.to_device(raw_extra, step_generator(seed + EXTRA_SEED_TAG, self.rank, step))
        return batch, cursor, extra_cursor

    def to_device(self, raw: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """A reader batch as model inputs on the device: pinned and copied (on CUDA), its
        JPEGs decoded there when the reader left them encoded (`data.decode`), augmented.
        While the device decodes, the crash note holds the batch's rows, as the reader's
        does while its threads decode."""
        if self.device.type == "cuda":
            raw = pinned(raw)
        encoded = raw.get("jpeg")
        if encoded is None:
            return self.transforms(raw, device=self.device, generator=generator)
        indices = raw["index"].tolist()
        for index, (shard, row), clip_id in zip(indices, encoded["rows"], raw["clip_id"]):
            self.note.started(index, shard, row, clip_id)
        try:
            batch = self.transforms(raw, device=self.device, generator=generator)
        except CorruptClipError as err:
            # A damaged input, as service.errors names it: the same row would fail every retry.
            raise DataError(str(err)) from None
        for index in indices:  # not on an error: the note keeps the rows of the batch that raised
            self.note.finished(index)
        return batch

    def step(self, batch: dict[str, Any], *, measure: bool) -> StepOutput:
        """The method's step on this rank's batch (`workers.step.train_step`, the query
        encoders in DDP). A non-finite loss changes nothing on any rank; with a fused
        optimiser the verdict stays on the device (the loop reads it with `check_finite`
        after the exchange), else every rank stops together inside the step."""
        if self.state.step == self.faults.nan_step:
            batch["video"] = batch["video"] * float("nan")
        return train_step(
            self.state,
            batch,
            exchange=self.exchange,
            method=self.cfg.method,
            grad_clip=self.cfg.optim.grad_clip,
            amp_dtype=autocast_dtype(self.cfg.train.precision, self.device),
            channels_last=use_channels_last(self.cfg.train, self.device),
            all_finite=lambda ok: collectives.all_ranks_true(ok, self.device),
            all_finite_on_device=collectives.all_ranks_true_on_device,
            defer_check=True,
            measure=measure,
        )

    def close(self, *, status: str = "FINISHED") -> None:
        """Stop the readers and write what is left; `status` ends the trackers' runs."""
        if self.batches is not None:
            self.batches.close(timeout_s=0)  # set to stop; it ends once the readers close below
        self.reader.close()
        if self.extra_reader is not None:
            self.extra_reader.close()
        self.note.close()
        self.logger.close(status=status)


def build_device(cfg: Config) -> torch.device:
    if cfg.resources.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def build_reader(
    cfg: Config,
    run: RunContext,
    *,
    rank: int,
    world_size: int,
    note: Any = None,
    extra: bool = False,
    device: torch.device | str = "cpu",
) -> ClipReader:
    """This rank's reader: the training stream (M / W clips a step) or, with `extra`, the
    fresh pool's stream (E / W clips a step, a uniform draw from the whole set); its JPEGs decoded on
    `device` or by the reader as `data.decode` says."""
    clips = cfg.num_extra_clips if extra else cfg.global_batch_size
    return training_reader(
        cfg,
        uri=run.data_uri,
        rank=rank,
        world_size=world_size,
        batch_size=clips // world_size,
        split=run.split,
        endpoint_url=run.endpoint_url,
        note=note,
        stream=EXTRA_STREAM if extra else 0,
        device=device,
    )


def build_worker(cfg: Config, run: RunContext) -> Worker:
    """This rank's readers, transforms, state, exchange, checkpointer and logger, restored
    from the run's newest checkpoint when Ray Train hands one over."""
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = build_device(cfg)
    torch.set_num_threads(max(1, cfg.resources.cpus_per_worker))
    faults = Faults.from_env()
    repeated = look_at_crashes(cfg, run, rank)  # before this rank's own note exists
    note = ReadingNote(run.run_uri, rank)
    try:
        reader = build_reader(cfg, run, rank=rank, world_size=world_size, note=faults.reader_note(note), device=device)
        extra_reader = None
        if cfg.num_extra_clips:
            extra_reader = build_reader(
                cfg, run, rank=rank, world_size=world_size, note=note, extra=True, device=device
            )
        state = build_train_state(cfg, device=device)
        replicas = build_replicas(cfg, device=device, with_shadows=rank == 0)
        schedule, client = None, None
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
            if extra_reader is not None and restored.extra_readers:
                extra_reader.load_state_dict(restored.extra_readers)
        if schedule is not None:
            schedule.start(
                actor_state=restored.actor if restored else None,
                pending_steps=restored.pending_steps if restored else [],
                replica_version=replicas.version,
            )
        nodes = collectives.gather_objects(node_name())
        if restored is not None and rank == 0:
            say_resize(restored.meta, nodes, checkpoint_uri=str(checkpoint.path))
        if world_size > 1:
            state.query = torch.nn.parallel.DistributedDataParallel(
                state.query, device_ids=[device.index] if device.type == "cuda" else None
            )
        measure = partial(
            step_statistics, temperature=cfg.method.temperature, in_batch_negatives=cfg.method.in_batch_negatives
        )
        log, tracker = NullMetricsLog(), Tracker()
        if rank == 0:
            tracker = open_run_trackers(cfg, run_uri=run.run_uri, run_id=run.run_id, endpoint_url=run.endpoint_url)
            log = MetricsLog(
                run_uri=run.run_uri,
                endpoint_url=run.endpoint_url,
                retry_budget_s=cfg.storage.retry_budget_s,
                tensorboard="tensorboard" in cfg.train.trackers,
            )
        return Worker(
            cfg=cfg,
            run=run,
            rank=rank,
            world_size=world_size,
            device=device,
            reader=reader,
            extra_reader=extra_reader,
            transforms=build_transforms(cfg, device=device),
            state=state,
            exchange=ActorExchange(cfg=cfg, replicas=replicas, schedule=schedule, measure=measure),
            checkpointer=Checkpointer(cfg, run_id=run.run_id),
            logger=MetricsLogger(
                log,
                log_every=cfg.train.log_every,
                total=cfg.train.steps,
                rank=rank,
                report=client.report_progress if client is not None else None,
                tracker=tracker,
            ),
            faults=faults,
            note=note,
            repeated_crash=repeated,
            start_step=state.step,
            nodes=nodes,
            resumed_checks=resumed_checks(replicas, schedule, device=device) if restored is not None else {},
        )
    except BaseException as err:  # a Python error: Ray Train reports it; not a crash to blame on rows
        note.raised(err)
        note.close()
        raise


def resumed_checks(replicas: Replicas, schedule: DeltaSchedule | None, *, device: torch.device) -> dict[str, float]:
    """After a resume (a restart, a resize), before the first step: are the replicas of every
    rank identical, and do they, with the deltas still pending, equal the actor's
    dictionaries? (`dict/replicas_agree`, `dict/replicas_match_actor`: 1 or 0)"""
    mine = torch.tensor([replicas.checksum(), float(replicas.version)], device=device, dtype=torch.float64)
    everyone = collectives.gather_rows(mine[None])  # W x 2
    result = {"dict/replicas_agree": float(bool((everyone == everyone[0]).all()))}
    if schedule is not None:
        expected = replicas.clone()
        for _, delta in schedule.pending:  # restored from the checkpoint: deltas, not in flight
            expected.apply(delta)
        actor = schedule.actor_state(replicas)
        saved = actor["dictionaries"]
        same = actor["version"] == expected.version and all(
            torch.equal(to_torch(saved[f"dictionary_{m}"]["keys"], device), expected.dictionary(m).keys) for m in "va"
        )
        result["dict/replicas_match_actor"] = float(same)
    return result


def node_name() -> str:
    """This process's Ray node as people name it: "<id prefix> (<ip>)"."""
    import ray

    return f"{ray.get_runtime_context().get_node_id()[:8]} ({ray.util.get_node_ip_address()})"


def say_resize(meta: dict[str, Any], nodes: list[str], *, checkpoint_uri: str) -> None:
    """Rank 0, resuming: when the worker group has another size than the checkpoint's, a line
    in the job's log saying what changed (nodes lost or gained) and where training resumes."""
    saved_size, saved_nodes = int(meta.get("world_size", len(nodes))), list(meta.get("nodes") or [])
    if saved_size == len(nodes):
        return
    lost = sorted(set(saved_nodes) - set(nodes))
    gained = sorted(set(nodes) - set(saved_nodes))
    why = []
    if lost:
        why.append(f"after losing node{'s' if len(lost) > 1 else ''} {', '.join(lost)}")
    if gained:
        why.append(f"with node{'s' if len(gained) > 1 else ''} {', '.join(gained)} joining")
    say(
        f"cmacc: resized {saved_size} -> {len(nodes)} workers {' and '.join(why) or '(same nodes)'}; "
        f"resumed from checkpoint {checkpoint_uri} (step {meta.get('step')})"
    )


def look_at_crashes(cfg: Config, run: RunContext, rank: int) -> str:
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
        history = record_crash(
            run.run_uri, notes, endpoint_url=run.endpoint_url, retry_budget_s=cfg.storage.retry_budget_s
        )
        verdict = repeated_crash(history)
    return collectives.broadcast_from_rank0(verdict)


def config_of(loop_config: dict[str, Any]) -> tuple[Config, RunContext]:
    """The config and run context Ray Train hands every worker (`train_loop_config`)."""
    return config_module.from_dict(loop_config["config"]), RunContext(**loop_config["run"])
