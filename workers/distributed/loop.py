"""What every Ray Train worker runs: DDP training against replicas of the dictionaries kept
by the dictionary actor (docs/architecture.md, "A training step").

`run_steps` reads top to bottom: each step a batch from the rank's readers, the method's
step (`workers.step.train_step`, with the exchange of `workers.distributed.exchange`), the
stop and finiteness verdicts, the step's metrics (`metrics_logger`), and a checkpoint when
one is due (`checkpoint.Checkpointer`). The parts are built in `worker.build_worker`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from service import storage
from workers.distributed import collectives
from workers.distributed.metrics_logger import say
from workers.distributed.worker import Worker, build_worker, config_of
from workers.step import NonFiniteLossError, check_finite, step_metrics
from workers.tensors import to_torch


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The function every Ray Train worker runs. Returns the outcome (rank 0's reaches the
    driver as `Result.return_value`): `state` (succeeded, stopped or failed), `step`,
    `metrics` of the last step, `error`."""
    cfg, run = config_of(loop_config)
    if not run.verbose:
        quiet_ray_train_info()
    worker = build_worker(cfg, run)
    status = "FAILED"  # of the MLflow and W&B runs, unless the loop ends otherwise
    try:
        if worker.repeated_crash:
            return failed(worker, worker.state.step, worker.repeated_crash)
        outcome = run_steps(worker)
        status = {"succeeded": "FINISHED", "stopped": "KILLED"}.get(outcome["state"], "FAILED")
        return outcome
    except BaseException as err:
        worker.note.raised(err)
        raise
    finally:
        worker.close(status=status)


def run_steps(w: Worker) -> dict[str, Any]:
    """Steps until `train.steps`, a stop request or a non-finite loss; returns the outcome.

    A step waits for the device only where the method needs it: with `max_staleness = 0`,
    for the copy of the global batch the actor selects from before the next step (rank 0).
    Loss values and finiteness stay on the device and are read when the metrics are written
    (every `train.log_every` steps, at checkpoints and at the end) or a step later."""
    cfg, state = w.cfg, w.state
    total, start_step = cfg.train.steps, state.step
    state.query.train()
    state.key.train()
    stop = False
    while state.step < total and not stop:
        step = state.step
        w.note.at_step(step)
        w.faults.before_step(step, w.rank, w.exchange.schedule.client if w.exchange.schedule else None)
        started = time.perf_counter()
        batch = w.next_batch(step)
        loaded = time.perf_counter()
        log_due = w.logger.due(step + 1)
        try:
            out = w.step(batch, measure=log_due)
        except NonFiniteLossError as err:
            return failed(w, step, str(err))
        exchanged = out.exchanged
        if exchanged.error:
            return failed(w, state.step, exchanged.error)
        stop = exchanged.stop_requested or state.step == w.faults.stop_step
        at_end = state.step >= total or stop
        # A node is about to be preempted: a checkpoint now, and training goes on; when the node
        # goes, Ray Train restarts the group (smaller, if elastic) from it.
        notice = not w.preemption_seen and preempted(state.step, cfg.train.log_every, rank=w.rank)
        w.preemption_seen |= notice
        checkpoint_due = w.checkpointer.due(state.step, at_end=at_end) or notice
        error = check_steps(w, out, now=log_due or checkpoint_due or stop)
        if error:
            return failed(w, error[0], error[1])
        step_ended_at, compute_s = time.time(), time.perf_counter() - loaded

        record = step_metrics(out, num_clips=exchanged.batch.num_clips, compute_s=compute_s)
        record.update(data_metrics(w, wait_s=loaded - started))
        record.update(w.exchange.actor_metrics(exchanged))
        record.update(exchanged.statistics)
        if step == start_step:  # marks where each attempt began: the steps a failure cost
            record["run/start_step"] = float(start_step)
            record.update(w.resumed_checks)  # after a restart or a resize: replicas and actor agree
        digests = dict(exchanged.digests)
        actor_state = None
        if checkpoint_due:
            actor_state, error_text = w.exchange.actor_state(digests)
            if error_text:
                return failed(w, state.step, error_text)
        if at_end:
            record.update(final_checks(w, actor_state))
            record.update({"stopped": 1.0} if stop else {})
        for record_step, digest in digests.items():
            if record_step == state.step:
                record["data/batch_digest"] = digest
            else:
                w.logger.patch(record_step, {"data/batch_digest": digest})
        w.logger.add(state.step, record, at=step_ended_at)

        if log_due or checkpoint_due:
            w.logger.flush()
        w.logger.progress(state.step, record, force=at_end)
        if log_due or at_end:
            w.logger.line(state.step)
        if checkpoint_due:
            w.logger.sync()
            w.checkpointer.save(
                state=state,
                reader=w.cursor,  # the cursors after this step's batch, not after one prefetched since
                extra_reader=w.extra_cursor,
                replicas=w.exchange.replicas,
                schedule=w.exchange.schedule,
                actor_state=actor_state,
                metrics=w.logger.written,
                nodes=w.nodes,
            )
            w.logger.checkpointed(state.step, record)
    return {"state": "stopped" if stop else "succeeded", "step": state.step, "metrics": w.logger.written, "error": ""}


def quiet_ray_train_info() -> None:
    """Keep Ray Train's INFO records (each report's metrics, one line per checkpoint) off the
    worker's console; they stay in Ray Train's log files. Some of them come from loggers
    named after Ray's source files, outside the `ray.train` hierarchy that
    `RunConfig(logging_config=...)` filters, hence a filter on the console handlers."""

    def not_ray_info(record: logging.LogRecord) -> bool:
        from_ray = record.name.startswith("ray.") or "/ray/" in record.name
        return not (from_ray and record.levelno < logging.WARNING)

    for handler in logging.getLogger().handlers:  # the console's, not Ray Train's log files
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(not_ray_info)


def check_steps(w: Worker, out: Any, *, now: bool) -> tuple[int, str] | None:
    """Finiteness, read where it waits for nothing: the previous step's (its results reached
    the host with this exchange), and this step's too when `now` (before a checkpoint, a log
    step or a stop); else this one is read next step. (step, error) of a non-finite one."""
    unchecked = [o for o in (w.unchecked, out) if o is not None]
    w.unchecked = None if now else unchecked.pop()
    for done in unchecked:
        try:
            check_finite(done)
        except NonFiniteLossError as err:
            return done.step, str(err)
    return None


def failed(w: Worker, step: int, error: str) -> dict[str, Any]:
    """The outcome of a run that every rank ends at once, without an exception Ray Train would
    retry: a non-finite loss, or a dictionary actor that could not be recovered (training on
    without dictionary updates would be another method). The steps logged so far are
    written first."""
    metrics = w.logger.flush()
    message = f"{error}; the last good checkpoint is kept"
    say(f"cmacc: error: {message}")
    return {"state": "failed", "step": step, "metrics": metrics, "error": message}


def data_metrics(w: Worker, *, wait_s: float) -> dict[str, float]:
    """`data/batch_digest` joins the record when rank 0 submits the batch."""
    return {
        "data/wait_s": wait_s,
        "data/skipped": float(w.cursor.num_skipped if w.cursor is not None else w.reader.num_skipped),
        "storage/retries": float(sum(storage.RETRIES.values())),  # this rank's process, since it started
        "train/world_size": float(w.world_size),
    }


def final_checks(w: Worker, actor: dict[str, Any] | None) -> dict[str, float]:
    """At the end: are all replicas identical to each other and to the actor, at its version?"""
    import ray

    replicas = w.exchange.replicas
    mine = torch.tensor([replicas.checksum(), float(replicas.version)], device=w.device, dtype=torch.float64)
    everyone = collectives.gather_rows(mine[None])  # W x 2
    nodes = collectives.gather_objects(ray.get_runtime_context().get_node_id())
    result = {
        "dict/replicas_agree": float(bool((everyone == everyone[0]).all())),
        "cluster/num_nodes": float(len(set(nodes))),
    }
    if actor is not None:  # rank 0
        saved = actor["dictionaries"]
        same = actor["version"] == replicas.version and all(
            torch.equal(to_torch(saved[f"dictionary_{m}"]["keys"], w.device), replicas.dictionary(m).keys) for m in "va"
        )
        result["dict/replicas_match_actor"] = float(same)
        result["dict/actor_version"] = float(actor["version"])
    return result


def preempted(step: int, every: int, *, rank: int) -> bool:
    """A preemption notice for a node of the worker group (Ray Core marks the node draining:
    docs/scaling.md, "Preemption"); asked every `every` steps by all ranks, because Ray Train
    answers it with a barrier over the worker group."""
    import ray.train

    if step % every:
        return False
    info = ray.train.get_preemption_info()
    if info is not None and rank == 0:
        say(f"cmacc: preemption notice for node(s) {', '.join(info.preempted_node_ids)}: checkpoint at step {step}")
    return info is not None
