"""The Ray Train worker side of a pretraining run (docs/architecture.md, "A training step"),
one module per concern, as torchtitan splits its trainer:

* `loop`: what every worker runs (`train_loop_per_worker`); `run_steps` reads top to bottom.
* `worker`: the rank's trainer (`Worker`: readers, transforms, state, exchange, checkpointer,
  logger) and the builders that make and restore it.
* `exchange`: step 4 on a cluster: gather the global batch, send it to the actor, apply the
  deltas due (`ActorExchange`).
* `replicas`: this rank's copies of the dictionaries and rank 0's schedule of the actor's
  deltas (`Replicas`, `DeltaSchedule`), with re-seeding after an actor restart.
* `checkpoint`: when a checkpoint is due and what its folder holds, written and read.
* `metrics_logger`: the step records, the progress line and the driver's progress.
* `collectives`: the torch.distributed calls (gather, broadcast, agreement).
* `crashes`, `faults`: notes dead workers leave behind; test hooks that inject failures.

The per-step math is `workers.step.train_step`, the same as the single-process trainer's.
"""
