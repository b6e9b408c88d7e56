"""Learning is real: the demo recipe's CM-ACC pretraining on generated clips makes the frozen
encoders better at the class than the same encoders at their random initialisation, and a
broken loss does not.

The data is `workers.data.synth` with the demo's parameters (512 clips, 4 classes; the class
sets the shape in the picture and the timbre of the sound); the encoders, transforms, loss,
dictionaries, active sampler and trainer are the production ones (`workers.trainer.train`,
single process, CPU). The linear probe fits on the train split's frozen features and scores
the held-out split (116 clips).

Margins (linear-probe top-1 above the untrained encoders') and why. The run is the demo's
recipe cut to STEPS = 400 (the demo trains 600; 200 and 300 steps left video at the untrained
level), the shortest that still separates the two losses. Measured on 2 cores
(`pytest -s tests/unit/test_learning.py`, 2026-12-04): the real loss took video from 0.388
to 0.586 (+0.20) and audio from 0.931 to 1.000 (+0.07); the broken loss pairs each clip's
video with another clip's sound (keys rolled by one within the batch), so no
correspondence is left to learn: video 0.388 -> 0.293 (-0.09), audio 0.931 -> 0.716 (-0.22).
The margins, +0.10 video and +0.03 audio, sit between the two with room for run-to-run noise (one standard error at 116
held-out clips is about 4 points); the broken loss cannot reach them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workers.step as step_module
import workers.trainer as trainer
from service.config import load_recipe
from workers.data.synth import render
from workers.data.transforms import build_transforms
from workers.evaluate import untrained_encoders
from workers.probe import extract_features, linear_probe

pytestmark = pytest.mark.slow

MARGINS = {"video": 0.10, "audio": 0.03}
STEPS = 400


@pytest.fixture(scope="module")
def cfg():
    return load_recipe("demo", [f"train.steps={STEPS}"])


@pytest.fixture(scope="module")
def data(cfg):
    d = cfg.data
    clips = [
        render(
            i,
            seed=0,
            num_classes=d.num_classes,
            frames=d.frames,
            size=d.size,
            seconds=d.clip_seconds,
            sample_rate=d.sample_rate,
        )
        for i in range(d.num_clips)
    ]
    return {
        "frames": torch.from_numpy(np.stack([c["frames"] for c in clips])),
        "audio": torch.from_numpy(np.stack([c["audio"] for c in clips])),
        "label": torch.tensor([c["label"] for c in clips]),
        "train": torch.tensor([i for i, c in enumerate(clips) if c["split"] == "train"]),
        "test": torch.tensor([i for i, c in enumerate(clips) if c["split"] == "test"]),
    }


def model_inputs(transforms, data, rows, generator=None):
    """Rows of the in-memory data set as a reader batch, through `transforms`."""
    raw = {"frames": data["frames"][rows], "audio": data["audio"][rows], "index": rows, "label": data["label"][rows]}
    return transforms(raw, device=torch.device("cpu"), generator=generator)


def training_batches(cfg, data):
    """Shuffled epochs of the train split through the training transforms, as the reader would."""
    transforms = build_transforms(cfg, device=torch.device("cpu"), train=True)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    size = cfg.train.batch_size
    while True:
        order = data["train"][torch.randperm(len(data["train"]), generator=generator)]
        for start in range(0, len(order) - size + 1, size):
            yield model_inputs(transforms, data, order[start : start + size], generator)


def probe(cfg, data, model) -> dict[str, float]:
    transforms = build_transforms(cfg, device=torch.device("cpu"), train=False)

    def batches(rows):
        for start in range(0, len(rows), 128):
            yield model_inputs(transforms, data, rows[start : start + 128])

    train, test = extract_features(model, batches(data["train"])), extract_features(model, batches(data["test"]))
    e = cfg.eval
    return {
        m: linear_probe(
            train[m],
            train["label"],
            test[m],
            test["label"],
            num_classes=cfg.data.num_classes,
            epochs=e.linear_epochs,
            lr=e.linear_lr,
            weight_decay=e.linear_weight_decay,
        ).top1
        for m in ("video", "audio")
    }


@pytest.fixture(scope="module")
def untrained(cfg, data):
    return probe(cfg, data, untrained_encoders(cfg))


def pretrain(cfg, data) -> dict[str, float]:
    torch.set_num_threads(min(2, torch.get_num_threads()))  # 1 where a test worker shares the cores
    result = trainer.train(cfg, training_batches(cfg, data))
    return probe(cfg, data, result.state.query)


def test_pretraining_beats_random_encoders_by_the_margins(cfg, data, untrained):
    pretrained = pretrain(cfg, data)
    print(f"untrained {untrained}  pretrained {pretrained}")
    for modality, margin in MARGINS.items():
        assert pretrained[modality] - untrained[modality] >= margin, (modality, untrained, pretrained)


def test_a_broken_loss_does_not_reach_the_margins(cfg, data, untrained, monkeypatch):
    real_loss = step_module.cross_modal_nce

    def mismatched(**parts):  # every clip's video meets another clip's sound as its positive
        parts["keys_a"] = parts["keys_a"].roll(1, dims=0)
        parts["keys_v"] = parts["keys_v"].roll(1, dims=0)
        return real_loss(**parts)

    monkeypatch.setattr(step_module, "cross_modal_nce", mismatched)
    broken = pretrain(cfg, data)
    print(f"untrained {untrained}  broken loss {broken}")
    for modality, margin in MARGINS.items():
        assert broken[modality] - untrained[modality] < margin, (modality, untrained, broken)
