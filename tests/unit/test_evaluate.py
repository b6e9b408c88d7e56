"""`cmacc eval` end to end on small real files: the protocol chosen from the set's splits,
each modality the set has, per-class results whose confusion matrix sums to the clips
scored, PNGs beside the JSON in the run's eval/ folder, and a checkpoint whose tensors were
saved on a GPU loading on the CPU."""

import dataclasses
import io
import json
import os
import zipfile

import pytest
import torch

from service import config, layout, reports
from service.errors import UsageError
from service.requests import EvaluateRequest
from workers.data.format import DatasetWriter
from workers.data.synth import synth_clips
from workers.evaluate import evaluate, evaluate_checkpoint, load_query_encoders
from workers.models import build_encoders

pytestmark = pytest.mark.unit

CLASSES = 6


def small_cfg():
    return config.from_dict(
        {
            "model": {"embed_dim": 8, "video": {"width": 0.125, "frames": 2, "size": 16}, "audio": {"width": 0.125}},
            "data": {"clip_seconds": 0.25},
            "train": {"seed": 3},
            "eval": {"linear_epochs": 5, "knn_k": 3},
        }
    )


def as_if_saved_on_a_gpu(data: bytes) -> bytes:
    """A torch.save file whose tensors say they were on cuda:0 (as a GPU run's checkpoint
    does); loading it without a map location fails on a machine without CUDA."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            content = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                content = content.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(info, content)
    return out.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A checkpoint inside a run folder, its tensors marked as saved on cuda:0."""
    cfg = small_cfg()
    run = tmp_path_factory.mktemp("runs") / "r1"
    folder = run / "checkpoint-00000002"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save({"train": {"query": build_encoders(cfg.model).state_dict()}}, buffer)
    (folder / layout.TRAIN_FILE).write_bytes(as_if_saved_on_a_gpu(buffer.getvalue()))
    meta = {"step": 2, "run_id": "r1", "world_size": 1, "format": layout.CHECKPOINT_FORMAT, "config": cfg.to_dict()}
    (folder / layout.CHECKPOINT_META).write_text(json.dumps(meta))
    (run / layout.RUN_FILE).write_text(json.dumps({"run_id": "r1", "state": "succeeded", "data": "elsewhere"}))
    return str(folder)


def write_set(uri: str, num_clips: int, *, split, video: bool = True, audio: bool = True, clips_per_source=1) -> str:
    writer = DatasetWriter(uri, label_names=[f"class{c}" for c in range(CLASSES)], made_by={"generator": "test"})
    for i, clip in enumerate(synth_clips(num_clips, seed=1, num_classes=CLASSES, frames=2, size=16, seconds=0.25)):
        writer.add(
            dataclasses.replace(
                clip,
                frames=clip.frames if video else [],
                audio=clip.audio if audio else b"",
                source=f"video-{i // clips_per_source}.mp4",
                split=split(i),
            )
        )
    writer.close()
    return uri


def confusion_total(result: dict) -> int:
    return sum(map(sum, result["confusion"]))


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(checkpoint):
    model = load_query_encoders(checkpoint, small_cfg())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_folds_are_cross_validated_and_the_confusion_sums_to_the_clips_scored(tmp_path, checkpoint):
    data = write_set(str(tmp_path / "folds"), 40, split=lambda i: f"fold{1 + i % 4}")
    evaluation = evaluate_checkpoint(checkpoint, data_uri=data, baseline=False)
    assert evaluation["protocol"]["name"] == "folds"
    assert [f["name"] for f in evaluation["protocol"]["folds"]] == ["fold1", "fold2", "fold3", "fold4"]
    assert evaluation["modalities"] == ["video", "audio"]
    for modality in ("video", "audio"):
        for probe in ("linear", "knn"):
            result = evaluation["results"]["pretrained"][modality][probe]
            assert confusion_total(result) == 40 and sum(result["support"]) == 40
            assert len(result["folds"]) == 4 and "top1_std" in result and "top5" in result
            mean = sum(f["top1"] for f in result["folds"]) / 4
            assert result["top1"] == pytest.approx(mean)
    table = reports.format_table(evaluation)
    assert "4-fold cross-validation" in table and "±" in table and "top-5" in table and "class5" in table


def test_an_audio_only_set_without_splits_is_split_automatically_and_scores_audio(tmp_path, checkpoint):
    data = write_set(str(tmp_path / "audio"), 48, split=lambda i: None, video=False, clips_per_source=2)
    evaluation = evaluate_checkpoint(checkpoint, data_uri=data, test_fraction=0.25, seed=1)
    assert evaluation["protocol"]["name"] == "auto-split"
    assert evaluation["modalities"] == ["audio"]
    assert set(evaluation["results"]["pretrained"]) == {"audio"} == set(evaluation["results"]["untrained"])
    result = evaluation["results"]["pretrained"]["audio"]["linear"]
    assert confusion_total(result) == evaluation["splits"]["test"] > 0
    assert evaluation["splits"]["train"] + evaluation["splits"]["test"] == 48
    assert "automatic split" in reports.format_table(evaluation)


def test_a_video_only_set_with_an_official_split_scores_video_and_is_saved_with_its_pngs(tmp_path, checkpoint):
    data = write_set(str(tmp_path / "video"), 30, split=lambda i: "test" if i % 3 == 0 else "train", audio=False)
    evaluation = evaluate(EvaluateRequest(checkpoint=checkpoint, data=data), show_progress=False)
    assert evaluation["protocol"]["name"] == "split" and evaluation["splits"] == {"train": 20, "test": 10}
    assert set(evaluation["results"]["pretrained"]) == {"video"}
    saved = evaluation["saved"]
    assert os.path.dirname(saved) == os.path.join(os.path.dirname(checkpoint), "eval")
    assert os.path.basename(saved).startswith("checkpoint-00000002-video-")  # not the run's own data set
    with open(saved) as f:
        assert json.loads(f.read())["results"] == evaluation["results"]
    for probe in ("linear", "knn"):
        png = saved.removesuffix(".json") + f"-video-{probe}.png"
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_finetuning_reports_clip_and_video_level_top1_for_both_rows(tmp_path, checkpoint):
    """Several clips per source video: the video-level score averages them. Both rows train
    with the same budget; the result says so."""
    from service.requests import FinetuneSettings
    from workers.finetune import finetune_checkpoint, format_finetune

    data = write_set(
        str(tmp_path / "videos"), 48, split=lambda i: "test" if (i // 4) % 4 == 0 else "train", clips_per_source=4
    )
    settings = FinetuneSettings(epochs=2, batch_size=8, lr=0.05)
    result = finetune_checkpoint(checkpoint, data_uri=data, settings=settings)
    assert result["protocol"]["name"] == "split" and result["splits"] == {"train": 36, "test": 12}
    for row in ("pretrained", "scratch"):
        scores = result["results"][row]
        assert scores["test_clips"] == 12 and scores["test_videos"] == 3
        assert 0 <= scores["clip_top1"] <= 1 and scores["video_top1"] in (0, 1 / 3, 2 / 3, 1)
        assert len(scores["train_loss"]) == 2 and all(loss > 0 for loss in scores["train_loss"])
    assert "video top-1" in format_finetune(result)
    with pytest.raises(UsageError, match="--epochs"):
        FinetuneSettings(epochs=0)


def test_a_clip_that_cannot_be_decoded_is_left_out_and_said_not_waited_for(tmp_path, checkpoint):
    """Evaluation reads only the clips its protocol uses (not `unused` ones) and finishes when
    one cannot be decoded: left out, counted, said in the table."""
    uri = str(tmp_path / "bad")
    writer = DatasetWriter(uri, label_names=[f"class{c}" for c in range(CLASSES)], made_by={"generator": "test"})
    for i, clip in enumerate(synth_clips(30, seed=1, num_classes=CLASSES, frames=2, size=16, seconds=0.25)):
        split = "unused" if i >= 24 else "test" if i % 4 == 0 else "train"
        frames = [b"not a jpeg"] * len(clip.frames) if i in (5, 26) else clip.frames
        writer.add(dataclasses.replace(clip, frames=frames, source=f"v{i}", split=split))
    writer.close()
    evaluation = evaluate_checkpoint(checkpoint, data_uri=uri, baseline=False)
    assert evaluation["skipped_clips"] == 1  # clip 5; clip 26 is unused and never read
    assert evaluation["splits"] == {"train": 17, "test": 6}
    result = evaluation["results"]["pretrained"]["video"]["linear"]
    assert confusion_total(result) == 6
    assert "1 clips could not be decoded and were left out" in reports.format_table(evaluation)
