"""The Ray Train worker side of a pretraining run (docs/architecture.md, "A training step"),
one module per concern:

* `loop`: what every worker runs (`train_loop_per_worker`): builders, then the step loop.
* `replicas`: this rank's copies of the dictionaries and rank 0's schedule of the actor's
  deltas (`Replicas`, `DeltaSchedule`), with re-seeding after an actor restart.
* `collectives`: the torch.distributed calls (gather, broadcast, agreement).
* `checkpoint`: what a checkpoint folder holds, written and read.
* `faults`: test hooks that inject failures (environment variables, never set in production).

The per-step math is `workers.trainer.train_step`, the same as the single-process trainer.
"""
