"""`cmacc export` (workers/export.py, cli/export.py): a registered checkpoint's query encoders as
safetensors files with torchvision's names, a JSON per encoder, a model card, and the loader.

The checkpoints are laid out as a real run leaves them, without Ray (as the `run_root`
fixture of tests/integration/test_repeated_exits.py does), at width 1.0 so that torchvision's
own models load the files. Inputs are tiny (video 1x3x4x16x16, log-mel 1x1x16x20).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from cli.main import main
from service import config, layout, storage
from service.errors import CatalogError, CheckpointError
from workers import export as exporting
from workers.data.synth import write_synthetic
from workers.data.transforms import KINETICS_MEAN, KINETICS_STD
from workers.models import AudioBackbone, VideoBackbone, build_encoders

pytestmark = pytest.mark.unit

VIDEO_INPUT = (1, 3, 4, 16, 16)
AUDIO_INPUT = (1, 1, 16, 20)
TOP1 = {"video/linear": {"untrained": 0.25, "pretrained": 0.625}, "audio/knn": {"untrained": 0.5, "pretrained": 0.875}}
SETTINGS = ["model.video.frames=4", "model.video.size=16", "model.audio.n_mels=16", "data.clip_seconds=0.25"]


def run_config(arch: str, width: float = 1.0) -> config.Config:
    return config.load_recipe(
        "demo", [*SETTINGS, f"model.video.arch={arch}", f"model.video.width={width}", f"model.audio.width={width}"]
    )


def randomise_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm weights and statistics, so a wrong mapping changes the features."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)


def make_run(root: Path, run_id: str, cfg: config.Config, data: str, step: int = 4) -> tuple[str, nn.Module]:
    """A run folder with one registered checkpoint at `step`; (checkpoint URI, its query encoders)."""
    torch.manual_seed(len(run_id))
    model = build_encoders(cfg.model)
    randomise_batch_norms(model, torch.Generator().manual_seed(len(run_id)))
    run = root / run_id
    checkpoint = run / layout.checkpoint_name(step)
    checkpoint.mkdir(parents=True)
    torch.save({"train": {"query": model.state_dict()}}, checkpoint / layout.TRAIN_FILE)
    meta = {"step": step, "run_id": run_id, "format": layout.CHECKPOINT_FORMAT, "config": cfg.to_dict()}
    (checkpoint / layout.CHECKPOINT_META).write_text(json.dumps(meta))
    (run / layout.SNAPSHOT_FILE).write_text(json.dumps({"checkpoints": [{"path": str(checkpoint)}]}))
    evaluation = {"step": step, "uri": str(run / layout.EVAL_FOLDER / "checkpoint.json"), "top1": TOP1}
    record = {"run_id": run_id, "recipe": "demo", "sampler": "active", "state": "succeeded", "last_step": step}
    (run / layout.RUN_FILE).write_text(
        json.dumps({**record, "data": data, "eval": evaluation, "config": cfg.to_dict()})
    )
    return str(checkpoint), model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("export")
    data = str(base / "data")
    write_synthetic(data, 6, seed=1, num_classes=2, frames=2, size=16, seconds=0.25)
    root = base / "runs"
    found = {"root": str(root), "data": data, "base": base}
    for run_id, arch, width in (("r3d", "r3d_18", 1.0), ("r2p1d", "r2plus1d_18", 1.0), ("small", "r3d_18", 0.125)):
        found[run_id] = make_run(root, run_id, run_config(arch, width), data)
    # A newer checkpoint whose upload Ray Train never registered (not in the snapshot).
    unregistered = root / "r3d" / layout.checkpoint_name(8)
    unregistered.mkdir()
    (unregistered / layout.CHECKPOINT_META).write_text(json.dumps({"step": 8, "format": layout.CHECKPOINT_FORMAT}))
    found["unregistered"] = str(unregistered)
    return found


@pytest.fixture(scope="module")
def exported(runs) -> dict:
    """Exports: r3d (both modalities, by run id), r2p1d (video, by checkpoint), small (with heads)."""
    base, root = runs["base"], runs["root"]
    return {
        "r3d": exporting.export(run_id="r3d", storage_root=root, out=str(base / "out-r3d")),
        "r2p1d": exporting.export(checkpoint=runs["r2p1d"][0], modalities=("video",), out=str(base / "out-r2p1d")),
        "heads": exporting.export(run_id="small", storage_root=root, with_heads=True, out=str(base / "out-heads")),
    }


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VIDEO_INPUT, generator=generator), torch.randn(AUDIO_INPUT, generator=generator)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("run_id", "arch"), [("r3d", "r3d_18"), ("r2p1d", "r2plus1d_18")])
def test_torchvisions_video_model_loads_the_export_with_only_fc_missing_and_gives_our_features(
    runs, exported, run_id, arch
):
    out = Path(exported[run_id]["out"])
    model = getattr(torchvision.models.video, arch)()
    result = model.load_state_dict(load_file(str(out / "video.safetensors")), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    model.fc = nn.Identity()
    video, _ = inputs()
    with torch.no_grad():
        close(model.eval()(video), runs[run_id][1].video.features(video))
    info = json.loads((out / "video.json").read_text())
    assert info["architecture"] == arch and info["torchvision"]["compatible"] is True
    assert info["torchvision"]["model"] == f"torchvision.models.video.{arch}"


def test_a_one_channel_resnet18_loads_the_audio_export_with_only_fc_missing_and_gives_our_features(runs, exported):
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    result = model.load_state_dict(load_file(str(Path(exported["r3d"]["out"]) / "audio.safetensors")), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    model.fc = nn.Identity()
    _, audio = inputs()
    with torch.no_grad():
        close(model.eval()(audio), runs["r3d"][1].audio.features(audio))


def test_the_loader_returns_ready_torchvision_modules_with_our_features(runs, exported):
    encoders = exporting.load_exported(exported["r3d"]["out"])
    assert set(encoders) == {"video", "audio"} and not encoders.heads
    assert isinstance(encoders["video"], torchvision.models.video.VideoResNet)
    assert isinstance(encoders["audio"], torchvision.models.ResNet)
    assert not encoders["video"].training and not encoders["audio"].training
    video, audio = inputs(1)
    ours = runs["r3d"][1]
    with torch.no_grad():
        close(encoders["video"](video), ours.video.features(video))
        close(encoders["audio"](audio), ours.audio.features(audio))
    only = exporting.load_exported(exported["heads"]["out"], "audio")
    assert list(only) == ["audio"] and only.info["audio"]["architecture"] == "resnet18"
    with pytest.raises(CheckpointError, match=r"audio\.json"):
        exporting.load_exported(exported["r2p1d"]["out"], "audio")


def test_the_json_says_how_to_rebuild_and_feed_each_encoder(runs, exported):
    out = Path(exported["r3d"]["out"])
    video = json.loads((out / "video.json").read_text())
    audio = json.loads((out / "audio.json").read_text())
    cfg = run_config("r3d_18")
    for info in (video, audio):
        assert info["width"] == 1.0 and info["feature_dim"] == 512 and info["head_included"] is False
        assert (info["embed_dim"], info["head_hidden"], info["head_norm"]) == (128, 128, "none")
        assert info["source"]["step"] == 4 and info["source"]["run_id"] == "r3d"
        assert info["source"]["data"] == {"uri": runs["data"], "num_clips": 6, "frame_rate": 8.0, "frame_rates": [8.0]}
    assert (video["frames"], video["frame_size"], video["frame_rate"]) == (4, 16, 8.0)
    prep = video["preprocessing"]
    close(torch.tensor(prep["mean"]), torch.tensor(KINETICS_MEAN))
    close(torch.tensor(prep["std"]), torch.tensor(KINETICS_STD))
    assert prep["clip_norm"] is video["clip_norm"] is cfg.model.video.clip_norm is True
    assert audio["architecture"] == "resnet18" and audio["torchvision"]["changes"]["conv1"] == exporting.AUDIO_CONV1
    spec = audio["preprocessing"]
    assert (spec["sample_rate"], spec["n_mels"], spec["hop_ms"], spec["hop_length"]) == (16000, 16, 20.0, 320)
    assert (spec["win_length"], spec["n_fft"], spec["clip_norm"], spec["num_frames"]) == (400, 512, False, 13)
    assert (audio["sample_rate"], audio["clip_seconds"]) == (16000, 0.25)


def test_with_heads_adds_the_head_tensors_and_the_loader_rebuilds_the_heads(runs, exported):
    out = Path(exported["heads"]["out"])
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "audio.json",
        "audio.safetensors",
        "video.json",
        "video.safetensors",
    ]
    encoders = exporting.load_exported(str(out))
    ours = runs["small"][1]
    video, audio = inputs(2)
    for modality, x in (("video", video), ("audio", audio)):
        tensors = load_file(str(out / f"{modality}.safetensors"))
        heads = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
        assert heads and set(heads) == set(getattr(ours, modality).head.state_dict())
        assert json.loads((out / f"{modality}.json").read_text())["head_included"] is True
        with torch.no_grad():
            embedding = F.normalize(encoders.heads[modality](encoders[modality](x)), dim=1)
            close(embedding, getattr(ours, modality)(x))
    assert "exported under `head.`" in (out / "README.md").read_text()


def test_the_model_card_names_recipe_steps_sampler_probe_results_and_how_to_load(runs, exported):
    out = exported["r3d"]["out"]
    card = (Path(out) / "README.md").read_text()
    for expected in (
        "run r3d, step 4",
        "| recipe | demo |",
        "| steps | 4 of 600",
        "| sampler | active |",
        "| pool | stream",
        runs["data"],
        "(6 clips)",
        "8 fps",
        "| video/linear | 0.250 | 0.625 |",
        "| audio/knn | 0.500 | 0.875 |",
        f"`conv1 = {exporting.AUDIO_CONV1}`",
        *exporting.usage_lines(out),
        "video = torchvision.models.video.r3d_18()",
        f"audio.conv1 = {exporting.AUDIO_CONV1}",
        'audio.load_state_dict(load_file("audio.safetensors"))',
    ):
        assert expected in card, expected
    assert exported["r3d"]["load"] == exporting.usage_lines(out)


def test_other_widths_keep_the_names_and_the_loader_rebuilds_our_backbones(runs, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["export", "--run", "small", "--storage", runs["root"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "video.safetensors") in printed and "load_exported" in printed
    encoders = exporting.load_exported(str(out))
    assert isinstance(encoders["video"], VideoBackbone) and isinstance(encoders["audio"], AudioBackbone)
    assert not encoders.info["video"]["torchvision"]["compatible"]
    video, audio = inputs(3)
    ours = runs["small"][1]
    with torch.no_grad():
        close(encoders["video"](video), ours.video.features(video))
        close(encoders["audio"](audio), ours.audio.features(audio))
    names = set(load_file(str(out / "audio.safetensors")))
    assert {"conv1.weight", "bn1.running_var", "layer4.1.bn2.weight", "layer2.0.downsample.0.weight"} <= names
    assert "torchvision's classes do not fit" in (out / "README.md").read_text()


def test_the_command_line_exports_to_a_uri_as_json_and_exits_0(runs, capsys):
    out = "memory://cmacc-export-test/cli"
    argv = ["export", "--checkpoint", runs["small"][0], "--out", out, "--modality", "audio", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 4 and result["run_id"] == "small" and result["modalities"] == ["audio"]
    assert result["torchvision_compatible"] == {"audio": False} and result["with_heads"] is False
    assert [f["name"] for f in result["files"]] == ["audio.safetensors", "audio.json", "README.md"]
    for entry in result["files"]:
        assert entry["uri"].startswith(out) and storage.size(entry["uri"]) == entry["bytes"] > 0
    encoders = exporting.load_exported(out)
    assert list(encoders) == ["audio"] and isinstance(encoders["audio"], AudioBackbone)
    storage.remove(out, recursive=True)


@pytest.mark.parametrize(
    ("case", "error"),
    [("unregistered", CatalogError), ("missing", CheckpointError), ("unknown run", CatalogError)],
)
def test_an_unregistered_or_missing_checkpoint_or_unknown_run_is_refused_naming_it_and_nothing_is_written(
    runs, tmp_path, capsys, case, error
):
    missing = str(Path(runs["root"]) / "r3d" / layout.checkpoint_name(99))
    which, named = {
        "unregistered": (["--checkpoint", runs["unregistered"]], runs["unregistered"]),
        "missing": (["--checkpoint", missing], missing),
        "unknown run": (["--run", "nope", "--storage", runs["root"]], "'nope'"),
    }[case]
    out = tmp_path / "out"
    assert main(["export", *which, "--out", str(out)]) == 1
    assert named in capsys.readouterr().err
    assert not out.exists()
    request = {"checkpoint": which[1]} if which[0] == "--checkpoint" else {"run_id": "nope", "storage_root": which[3]}
    with pytest.raises(error, match=r"registered|not a checkpoint|no run"):
        exporting.export(out=str(out), **request)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],  # neither --run nor --checkpoint
        ["--run", "r3d", "--checkpoint", "x"],
        ["--run", "r3d", "--modality", "sound"],
        ["--run", "../r3d"],  # not a run id
    ],
)
def test_usage_errors_exit_2_and_write_nothing(runs, tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert main(["export", *argv, "--storage", runs["root"], "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("cmacc: error:")
    assert not out.exists()


def test_tensor_names_map_to_torchvisions_and_back():
    for modality, backbone in (
        ("video", VideoBackbone(arch="r2plus1d_18", width=0.125)),
        ("audio", AudioBackbone(width=0.125)),
    ):
        state = backbone.state_dict()
        theirs = exporting.to_torchvision_names(state, modality)
        assert all(
            k.startswith(("stem.", "conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")) for k in theirs
        )
        assert list(exporting.from_torchvision_names(theirs, modality)) == list(state)
    with pytest.raises(CheckpointError, match=r"fc\.weight"):
        exporting.from_torchvision_names({"fc.weight": torch.zeros(1)}, "audio")
