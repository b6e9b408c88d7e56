"""An ablation's specification, its runs and where they stand.

An ablation `ID` under a storage root keeps `<root>/ablations/<ID>/ablation.json` (the spec)
and its report; each of its runs is an ordinary run `<root>/<ID>-<sampler>-s<seed>`, listed
by `cmacc runs` and resumable like any other. A run differs from its siblings only in
`method.sampler` and `train.seed` (the seed sets the initialisation, the data order and the
sampler's random stream, so runs of one seed share initialisation and data order).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from service import catalog, layout, storage
from service.config import Config
from service.errors import UsageError
from workers.driver import check_data

ABLATIONS_FOLDER = "ablations"
SPEC_FILE = "ablation.json"
VARIED = ("method.sampler", "train.seed", "eval.after_training")  # what the ablation sets per run


@dataclass(kw_only=True, frozen=True)
class AblationSpec:
    ablation_id: str
    storage: str  # storage root URI (absolute)
    data: str  # data set URI (absolute)
    recipe: str
    overrides: tuple[str, ...]
    samplers: tuple[str, ...]
    seeds: tuple[int, ...]

    @property
    def folder(self) -> str:
        return storage.join(self.storage, ABLATIONS_FOLDER, self.ablation_id)

    def run_id(self, sampler: str, seed: int) -> str:
        return f"{self.ablation_id}-{sampler}-s{seed}"

    def runs(self) -> list[tuple[str, int]]:
        """(sampler, seed) of every run, seed-major: each seed's samplers side by side."""
        return [(sampler, seed) for seed in self.seeds for sampler in self.samplers]

    def run_overrides(self, sampler: str, seed: int) -> tuple[str, ...]:
        """The run's `--set` list: the ablation's, then what makes this run differ."""
        return (*self.overrides, f"method.sampler={sampler}", f"train.seed={seed}", "eval.after_training=true")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(overrides=list(self.overrides), samplers=list(self.samplers), seeds=list(self.seeds))
        return out


def check(spec: AblationSpec, cfg: Config, *, endpoint_url: str = "") -> None:
    """Everything that can be refused before anything is written: the settings the ablation
    itself varies, run ids, an ablation id taken by other settings, a data set the runs
    cannot train on or be evaluated on."""
    for item in spec.overrides:
        key = item.partition("=")[0].strip()
        if key in VARIED:
            raise UsageError(f"--set {key}: the ablation sets it for each run (use --samplers and --seeds)")
    for sampler, seed in spec.runs():
        try:
            layout.check_run_id(spec.run_id(sampler, seed))
        except ValueError as err:
            raise UsageError(f"--id {spec.ablation_id!r} makes an invalid {err}") from None
    check_spec(spec, endpoint_url=endpoint_url)
    check_data(cfg, spec.data, need_test_split=True)


def check_spec(spec: AblationSpec, *, endpoint_url: str = "") -> None:
    """Refuse an ablation id that exists with other settings (nothing is written)."""
    uri = storage.join(spec.folder, SPEC_FILE)
    if not storage.exists(uri, endpoint_url=endpoint_url):
        return
    saved = json.loads(storage.read_bytes(uri, endpoint_url=endpoint_url))
    mine = spec.to_dict()
    differs = [key for key in mine if saved.get(key) != mine[key]]
    if differs:
        raise UsageError(
            f"ablation {spec.ablation_id!r} exists at {spec.folder} with other settings ({', '.join(differs)}): "
            "rerun it with the same ones to continue it, or choose another --id (nothing was changed)"
        )


def save_spec(spec: AblationSpec, *, endpoint_url: str = "") -> None:
    uri = storage.join(spec.folder, SPEC_FILE)
    storage.write_bytes(uri, json.dumps(spec.to_dict(), indent=2).encode(), endpoint_url=endpoint_url)


def status_of(spec: AblationSpec, sampler: str, seed: int, *, steps: int, endpoint_url: str = "") -> str:
    """What a run still needs: "done" (trained to `steps` and evaluated), "evaluate" (trained,
    not evaluated), "resume" (has a checkpoint) or "new"."""
    entry = catalog.read_run(spec.storage, spec.run_id(sampler, seed), endpoint_url=endpoint_url)
    if entry is None or entry.newest_checkpoint is None:
        return "new"
    info = entry.info
    trained = info.get("state") == "succeeded" and int(info.get("last_step", 0)) >= steps
    if not trained:
        return "resume"
    evaluation = info.get("eval") or {}
    return "done" if evaluation.get("step") == info.get("last_step") else "evaluate"


def statuses(spec: AblationSpec, *, steps: int, endpoint_url: str = "") -> dict[tuple[str, int], str]:
    """`status_of` every run, in the ablation's order."""
    return {
        (sampler, seed): status_of(spec, sampler, seed, steps=steps, endpoint_url=endpoint_url)
        for sampler, seed in spec.runs()
    }
