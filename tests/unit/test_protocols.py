"""Evaluation protocols (workers/protocols.py): official split, k folds each held out once,
and the automatic split: stratified, seeded, never splitting a source file."""

import numpy as np
import pytest

from service.errors import DataError, UsageError
from workers.protocols import ClipTable, choose, stratified_group_split

pytestmark = pytest.mark.unit


def table(splits, sources, labels) -> ClipTable:
    return ClipTable(split=list(splits), source=list(sources), label=np.asarray(labels, dtype=np.int64))


def test_the_official_split_is_used_when_the_set_has_one_and_unused_or_unlabelled_clips_stay_out():
    t = table(
        ["train", "train", "test", "unused", "test", "train"],
        ["a", "b", "c", "d", "e", "f"],
        [0, 1, 0, 1, -1, 1],
    )
    protocol = choose(t)
    assert protocol.name == "split" and len(protocol.folds) == 1
    assert protocol.folds[0].train.tolist() == [0, 1, 5] and protocol.folds[0].test.tolist() == [2]
    assert "official split" in protocol.description


def test_each_fold_is_held_out_once_and_the_others_train():
    folds = [f"fold{1 + i % 5}" for i in range(50)]
    t = table(folds, [f"s{i}" for i in range(50)], [i % 10 for i in range(50)])
    protocol = choose(t)
    assert protocol.name == "folds"
    assert [f.name for f in protocol.folds] == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    held = np.concatenate([f.test for f in protocol.folds])
    assert sorted(held.tolist()) == list(range(50)), "every clip held out exactly once"
    for fold in protocol.folds:
        assert not set(fold.train.tolist()) & set(fold.test.tolist())
        assert len(fold.train) + len(fold.test) == 50
        assert all(folds[i] == fold.name for i in fold.test)


def test_folds_sort_by_number_not_by_text():
    names = [f"fold{k}" for k in (1, 2, 10, 3)] * 2
    protocol = choose(table(names, [str(i) for i in range(8)], [0, 1] * 4))
    assert [f.name for f in protocol.folds] == ["fold1", "fold2", "fold3", "fold10"]


def test_the_automatic_split_is_stratified_seeded_and_keeps_a_source_on_one_side():
    rng = np.random.default_rng(0)
    sources, labels = [], []
    for c in range(6):  # 6 classes, 10 source videos each, 1 to 4 clips per video
        for v in range(10):
            for _ in range(int(rng.integers(1, 5))):
                sources.append(f"class{c}/video{v}.mp4")
                labels.append(c)
    t = table([None] * len(labels), sources, labels)
    protocol = choose(t, test_fraction=0.3, seed=7)
    assert protocol.name == "auto-split" and protocol.settings == {"test_fraction": 0.3, "seed": 7}
    fold = protocol.folds[0]
    labels = np.asarray(labels)
    for c in range(6):
        in_class = labels == c
        share = np.isin(np.flatnonzero(in_class), fold.test).mean()
        assert 0.15 <= share <= 0.45, (c, share)
    train_sources = {sources[i] for i in fold.train}
    test_sources = {sources[i] for i in fold.test}
    assert not train_sources & test_sources, "a source file on both sides"
    assert len(fold.train) + len(fold.test) == len(labels)
    again = choose(t, test_fraction=0.3, seed=7).folds[0]
    assert again.test.tolist() == fold.test.tolist()
    other = choose(t, test_fraction=0.3, seed=8).folds[0]
    assert other.test.tolist() != fold.test.tolist()


def test_a_class_with_one_source_file_only_trains():
    mask = stratified_group_split(np.array([0, 0, 1, 1, 1]), ["a", "a", "b", "c", "d"], test_fraction=0.5, seed=0)
    assert not mask[:2].any() and 0 < mask[2:].sum() < 3


def test_a_protocol_the_set_does_not_allow_is_refused_naming_its_splits():
    t = table(["train", "test"], ["a", "b"], [0, 1])
    with pytest.raises(UsageError, match=r"no fold1 ... foldK splits .*its splits: test, train"):
        choose(t, "folds")
    with pytest.raises(UsageError, match="no train and test splits"):
        choose(table([None, None], ["a", "b"], [0, 1]), "split")
    with pytest.raises(UsageError, match="--test-fraction"):
        choose(t, "auto-split", test_fraction=1.5)
    with pytest.raises(DataError, match="no labelled clip"):
        choose(table(["train", "test"], ["a", "b"], [-1, -1]))


def test_on_a_redundant_set_the_probes_fit_on_each_source_once_and_the_test_side_is_untouched():
    # source "a" (class 0) repeated four times, as AV-digits' head class: a probe fitted on
    # the repeats would learn that class 0 is most of the data.
    t = table(
        ["train", "train", "train", "train", "train", "train", "test", "test"],
        ["a", "b", "a", "c", "a", "a", "t1", "t2"],
        [0, 1, 0, 2, 0, 0, 0, 1],
    )
    assert choose(t).folds[0].train.tolist() == [0, 1, 2, 3, 4, 5], "an ordinary set keeps every clip"
    t.once_per_source = True
    protocol = choose(t)
    assert protocol.folds[0].train.tolist() == [0, 1, 3] and protocol.folds[0].test.tolist() == [6, 7]
    assert "one clip per source file (3 clips)" in protocol.description and protocol.to_dict()["once_per_source"]
