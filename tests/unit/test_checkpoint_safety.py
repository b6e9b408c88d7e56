"""Checkpoint files load without running code from them: tensors and plain values only.

A crafted `train.pt` or `actor.pt` (a pickled object whose unpickling calls `os.system`)
is refused by both readers, resume (`load_checkpoint`) and evaluation
(`load_query_encoders`), before anything it names runs. The real state the checkpoint
writer saves (encoders, optimiser, schedule, replicas, the actor with its history of
deltas) loads back equal through the same safe reader.
"""

import json
import os

import numpy as np
import pytest
import torch

from service import config, layout
from service.errors import CheckpointError
from workers.actor import DictionaryService
from workers.distributed.checkpoint import load_checkpoint
from workers.distributed.replicas import build_replicas
from workers.evaluate import load_query_encoders
from workers.tensors import load_tensors, to_numpy_deep, to_plain
from workers.training import build_train_state

pytestmark = pytest.mark.unit


class _RunsCode:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def small_cfg():
    return config.from_dict(
        {
            "model": {"embed_dim": 8, "video": {"width": 0.125, "frames": 2, "size": 16}, "audio": {"width": 0.125}},
            "method": {"sampler": "active", "dictionary_size": 12, "pool_size": 16},
            "train": {"batch_size": 4, "seed": 3},
        }
    )


def write_checkpoint(folder, cfg, *, train, actor) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(train, os.path.join(folder, layout.TRAIN_FILE))
    torch.save(actor, os.path.join(folder, layout.ACTOR_FILE))
    meta = {"step": 2, "run_id": "r", "world_size": 1, "format": layout.CHECKPOINT_FORMAT, "config": cfg.to_dict()}
    with open(os.path.join(folder, layout.CHECKPOINT_META), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(folder, layout.reader_file(0)), "w") as f:
        json.dump({"cursor": 0}, f)


def actor_with_history(cfg) -> DictionaryService:
    service = DictionaryService(config=cfg.to_dict())
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        batch = {
            name: torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1).numpy()
            for name in ("queries_v", "queries_a", "keys_v", "keys_a")
        }
        service.submit(step=step, clip_ids=np.arange(4 * step, 4 * step + 4), labels=np.arange(4) % 2, **batch)
    return service


def real_state(cfg):
    state = build_train_state(cfg, device=torch.device("cpu"))
    replicas = build_replicas(cfg, device=torch.device("cpu"))
    train = {"train": state.state_dict(), "replicas": replicas.state_dict(), "pending_steps": [3]}
    return train, actor_with_history(cfg).state_dict()


@pytest.mark.parametrize("poisoned", [layout.TRAIN_FILE, layout.ACTOR_FILE])
def test_a_checkpoint_crafted_to_run_code_is_refused_on_resume(tmp_path, poisoned):
    import ray.train

    cfg = small_cfg()
    marker = tmp_path / "ran"
    train, actor = real_state(cfg)
    parts = {layout.TRAIN_FILE: train, layout.ACTOR_FILE: to_plain(actor)}
    parts[poisoned] = {"train": _RunsCode(str(marker))}
    folder = tmp_path / "checkpoint-00000002"
    write_checkpoint(folder, cfg, train=parts[layout.TRAIN_FILE], actor=parts[layout.ACTOR_FILE])
    with pytest.raises(CheckpointError, match=rf"{poisoned}: refused: .*posix\.system"):
        load_checkpoint(ray.train.Checkpoint.from_directory(str(folder)))
    assert not marker.exists(), "the crafted file ran its command"


def test_a_checkpoint_crafted_to_run_code_is_refused_by_evaluation(tmp_path):
    cfg = small_cfg()
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoint-00000002"
    write_checkpoint(folder, cfg, train={"train": {"query": _RunsCode(str(marker))}}, actor={})
    with pytest.raises(CheckpointError, match=r"train\.pt: refused"):
        load_query_encoders(str(folder), cfg)
    assert not marker.exists(), "the crafted file ran its command"


def test_the_state_a_checkpoint_holds_loads_back_equal_without_unpickling_objects(tmp_path):
    import ray.train

    cfg = small_cfg()
    train, actor = real_state(cfg)
    assert actor["history"], "the actor kept deltas"
    folder = tmp_path / "checkpoint-00000002"
    write_checkpoint(folder, cfg, train=train, actor=to_plain(actor))
    restored = load_checkpoint(ray.train.Checkpoint.from_directory(str(folder)))

    for name, tensor in train["train"]["query"].items():
        assert torch.equal(restored.train["query"][name], tensor), name
    assert restored.train["optimizer"]["param_groups"] == train["train"]["optimizer"]["param_groups"]
    assert restored.pending_steps == [3]
    # The actor's state comes back as it travels through Ray (numpy), and a fresh actor takes it.
    assert isinstance(restored.actor["history"][0]["ids_v"], np.ndarray)
    fresh = DictionaryService(config=cfg.to_dict())
    fresh.load_state_dict(restored.actor)
    again = to_numpy_deep(fresh.state_dict())
    original = to_numpy_deep(actor)
    assert again["version"] == original["version"] == 3
    for modality in ("dictionary_v", "dictionary_a", "pool_v", "pool_a"):
        for part, value in original["dictionaries"][modality].items():
            np.testing.assert_array_equal(again["dictionaries"][modality][part], value, err_msg=f"{modality}.{part}")
    np.testing.assert_array_equal(
        again["dictionaries"]["sampler"]["generator"], original["dictionaries"]["sampler"]["generator"]
    )
    assert [d["version"] for d in again["history"]] == [1, 2, 3]
    np.testing.assert_array_equal(again["history"][-1]["keys_v"], original["history"][-1]["keys_v"])


def test_a_file_that_is_not_a_tensor_file_names_itself(tmp_path):
    path = tmp_path / "train.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(path)):
        load_tensors(str(path), where=str(path))


def test_format_2_checkpoints_evaluate_but_do_not_resume():
    layout.check_checkpoint_format({"format": 2}, "s3://b/r/checkpoint-00000004", to="evaluate")
    with pytest.raises(CheckpointError, match=r"format 2 stored the dictionary actor's state .* start a new run id"):
        layout.check_checkpoint_format({"format": 2}, "s3://b/r/checkpoint-00000004")
