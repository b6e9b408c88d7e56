"""`cmacc ablate`: runs that differ only in sampler and seed, then a report that compares
them (docs/architecture.md, "Ablations").

* `plan`: what an ablation is (`AblationSpec`), its runs' ids, and what storage says each
  run still needs (nothing, a resume, a fresh start, an evaluation).
* `runner`: the runs one after another on this machine, or side by side as cluster jobs.
* `report`: per-run figures from storage, aggregated over seeds into `report.md`,
  `report.json` and PNG plots in the ablation folder.
"""
