"""Which clips train the probes and which score them: the evaluation protocol of a data set
(docs/architecture.md, "Evaluation").

* `split`: the set's official `train` and `test` splits (UCF101, HMDB51 split 1, AV-digits'
  held-out speaker).
* `folds`: k-fold cross-validation over splits named `fold1` ... `foldK` (ESC-50's five
  folds): each fold is held out once while the probes fit on the others; results are the
  mean and standard deviation over folds.
* `auto-split`: a labelled set with neither (a folder of class folders): a seeded split,
  stratified by class, that keeps every clip of one source file on one side.

`auto` (the default) takes the first of these the set allows.

A set whose training clips were repeated on purpose (AV-digits' `--redundancy`, recorded in
its manifest) is redundant for pretraining only: under any protocol its probes fit on each
source file once (its first clip in the set), so they learn the classes of the set without
the redundancy, and a probe that answers the repeated class for every clip does not score
as if it had learned it. Numpy only: no torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import DataError, UsageError
from service.requests import EVAL_PROTOCOLS
from workers.data.format import read_manifest, read_shard_columns

PROTOCOLS = EVAL_PROTOCOLS
_FOLD = re.compile(r"^fold(\d+)$")


@dataclass(kw_only=True)
class ClipTable:
    """What the protocol needs of every clip, in manifest order."""

    split: list[str | None]
    source: list[str]
    label: np.ndarray  # int64, -1 when the clip has no label
    label_names: list[str] = field(default_factory=list)
    once_per_source: bool = False  # the probes fit on one clip of each source (a redundant set)

    def __len__(self) -> int:
        return len(self.source)


@dataclass(kw_only=True)
class Fold:
    name: str  # "test" for a single split, else the held-out fold's name
    train: np.ndarray  # clip indices (manifest order) the probes fit on
    test: np.ndarray  # clip indices they are scored on


@dataclass(kw_only=True)
class Protocol:
    name: str  # split | folds | auto-split
    folds: list[Fold]
    description: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "folds": [{"name": f.name, "train_clips": len(f.train), "test_clips": len(f.test)} for f in self.folds],
            **self.settings,
        }


def read_clip_table(uri: str, *, endpoint_url: str = "") -> ClipTable:
    """Split, source and label of every clip of the data set at `uri` (only those columns
    are read)."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    splits: list[str | None] = []
    sources: list[str] = []
    labels: list[int] = []
    for shard in manifest.shards:
        table = read_shard_columns(uri, shard, ["split", "source", "label"], endpoint_url=endpoint_url)
        splits += table.column("split").to_pylist()
        sources += table.column("source").to_pylist()
        labels += [-1 if label is None else int(label) for label in table.column("label").to_pylist()]
    return ClipTable(
        split=splits,
        source=sources,
        label=np.asarray(labels, dtype=np.int64),
        label_names=manifest.label_names,
        once_per_source=bool((manifest.made_by.get("params") or {}).get("redundancy")),
    )


def first_of_each_source(table: ClipTable, clips: np.ndarray) -> np.ndarray:
    """The clips of `clips` (manifest order) that are the first of their source among them."""
    seen: set[str] = set()
    keep = []
    for i in clips.tolist():
        if table.source[i] not in seen:
            seen.add(table.source[i])
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def choose(table: ClipTable, requested: str = "auto", *, test_fraction: float = 0.3, seed: int = 0) -> Protocol:
    """The protocol `requested` (or, for `auto`, the one the set's splits call for) over the
    set's labelled clips; on a redundant set the probes fit on each source once (see above)."""
    chosen = _choose(table, requested, test_fraction=test_fraction, seed=seed)
    if not table.once_per_source:
        return chosen
    for fold in chosen.folds:
        fold.train = first_of_each_source(table, fold.train)
    chosen.description += (
        f"; the set is redundant, so the probes fit on one clip per source file "
        f"({', '.join(str(len(f.train)) for f in chosen.folds)} clips)"
    )
    chosen.settings["once_per_source"] = True
    return chosen


def _choose(table: ClipTable, requested: str, *, test_fraction: float, seed: int) -> Protocol:
    """The protocol `requested` (or `auto`'s) over the set's labelled clips. UsageError when
    the set does not allow the requested one."""
    if requested not in PROTOCOLS:
        raise UsageError(f"--protocol {requested!r}: choose from {', '.join(PROTOCOLS)}")
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction: must be in (0, 1), got {test_fraction}")
    labelled = table.label >= 0
    if not labelled.any():
        raise DataError("the data set has no labelled clip: the probes need labels")
    names = np.asarray([s or "" for s in table.split], dtype=object)
    present = set(names[labelled].tolist())
    folds = sorted((name for name in present if _FOLD.match(name)), key=lambda name: int(_FOLD.match(name)[1]))
    has_split = {"train", "test"} <= present
    if requested == "auto":
        requested = "split" if has_split else "folds" if len(folds) >= 2 else "auto-split"
    if requested == "split":
        if not has_split:
            raise UsageError(f"--protocol split: the set has no train and test splits (its splits: {_list(present)})")
        train = np.flatnonzero(labelled & (names == "train"))
        test = np.flatnonzero(labelled & (names == "test"))
        return Protocol(
            name="split",
            folds=[Fold(name="test", train=train, test=test)],
            description=f"official split: probes fit on train ({len(train)} clips), scored on test ({len(test)})",
        )
    if requested == "folds":
        if len(folds) < 2:
            raise UsageError(f"--protocol folds: the set has no fold1 ... foldK splits (its splits: {_list(present)})")
        in_folds = labelled & np.isin(names, folds)
        return Protocol(
            name="folds",
            folds=[
                Fold(
                    name=fold,
                    train=np.flatnonzero(in_folds & (names != fold)),
                    test=np.flatnonzero(in_folds & (names == fold)),
                )
                for fold in folds
            ],
            description=f"{len(folds)}-fold cross-validation over {', '.join(folds)}: each fold held out once",
        )
    candidates = np.flatnonzero(labelled)
    test_mask = stratified_group_split(
        table.label[candidates], [table.source[i] for i in candidates], test_fraction=test_fraction, seed=seed
    )
    train, test = candidates[~test_mask], candidates[test_mask]
    return Protocol(
        name="auto-split",
        folds=[Fold(name="test", train=train, test=test)],
        description=(
            f"automatic split (the set has no train/test or fold splits): {len(test)} of {len(candidates)} "
            f"clips held out, stratified by class, seed {seed}, no source file on both sides"
        ),
        settings={"test_fraction": test_fraction, "seed": seed},
    )


def stratified_group_split(labels: np.ndarray, groups: list[str], *, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask over clips: per class, whole groups (source files) in a seeded order
    until the class's held-out clips reach `test_fraction` of its clips (at least one group
    when the class has two or more, never all of them). A group's class is its most common
    label, so every clip of a group falls on one side."""
    labels = np.asarray(labels)
    by_group: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        by_group.setdefault(group, []).append(i)
    classes: dict[int, list[str]] = {}
    for group, members in sorted(by_group.items()):
        values, counts = np.unique(labels[members], return_counts=True)
        classes.setdefault(int(values[np.argmax(counts)]), []).append(group)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in sorted(classes):
        members = classes[label]
        if len(members) < 2:
            continue  # one source file: it can only train
        order = [members[i] for i in rng.permutation(len(members))]
        total = sum(len(by_group[g]) for g in members)
        held = 0
        for group in order[:-1]:  # the last group always trains
            if held and held + len(by_group[group]) / 2 > test_fraction * total:
                break
            test[by_group[group]] = True
            held += len(by_group[group])
    return test


def _list(names: set[str]) -> str:
    return ", ".join(sorted(name or "(none)" for name in names)) or "none"
