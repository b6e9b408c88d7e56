"""Export a checkpoint's query encoders for use outside this project (`cmacc export`), and load
them back (`load_exported`).

Per modality the export folder (any URI) holds `<modality>.safetensors`, the query encoder's
backbone (with `--with-heads` also its projection head, under `head.`), and `<modality>.json`,
everything needed to rebuild and feed it; one `README.md` (the model card) describes the
whole export. Only registered checkpoints are exported, and everything is read and checked
before the first byte is written to the destination.

Tensor names are torchvision's, mapped at export: video `stem.*`, `layers.{0..3}.*` ->
`stem.*`, `layer{1..4}.*` (`torchvision.models.video.r3d_18`, `r2plus1d_18`); audio `stem.0`
-> `conv1`, `stem.1` -> `bn1`, `layers.i` -> `layer{i+1}` (`torchvision.models.resnet18`, a
one-channel `conv1`). At width 1.0 the shapes are torchvision's too (only `fc` is missing;
its forward with `fc = nn.Identity()` equals `Encoder.features`); at other widths channel
counts differ and `load_exported` rebuilds the project's own backbones.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from service import catalog, layout, storage
from service.config import Config
from service.errors import CheckpointError, InputError, UsageError
from workers.models import AudioBackbone, ProjectionHead, VideoBackbone

MODALITIES = ("video", "audio")
EXPORT_FORMAT = "cmacc-encoder-export"
EXPORT_VERSION = 1
CARD_NAME = "README.md"
HEAD_PREFIX = "head."
HEAD_NOTE = (
    "tensors under 'head.': workers.models.ProjectionHead (Linear, [BatchNorm1d,] ReLU, Linear[, BatchNorm1d without "
    "affine]); the embedding is F.normalize(head(features), dim=1)"
)
AUDIO_CONV1 = "torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)"
FRAME_RATE_SHARDS = 8  # shards whose clips' fps column is read for the frame rate
DATA_RETRY_BUDGET_S = 10.0  # the data set only adds facts to the card: do not wait long for it
VIDEO_CLIP_NORM = {
    True: "after (x - mean) / std, subtract each clip's own mean per channel over frames and pixels",
    False: "nothing more after (x - mean) / std",
}
AUDIO_CLIP_NORM = {
    True: "standardise each clip's log-mel: subtract its mean, divide by its std (over bins and frames, std >= 1e-5)",
    False: "nothing more after the log",
}


def weights_name(modality: str) -> str:
    return f"{modality}.safetensors"


def info_name(modality: str) -> str:
    return f"{modality}.json"


# --- tensor names: ours <-> torchvision's ----------------------------------------------------------

# (pattern at the start of a name, its replacement; `{}` takes the stage number, shifted)
_OURS = {
    "video": [(r"stem\.", "stem."), (r"layers\.(\d)\.", "layer{}.")],
    "audio": [(r"stem\.0\.", "conv1."), (r"stem\.1\.", "bn1."), (r"layers\.(\d)\.", "layer{}.")],
}
_THEIRS = {
    "video": [(r"stem\.", "stem."), (r"layer(\d)\.", "layers.{}.")],
    "audio": [(r"conv1\.", "stem.0."), (r"bn1\.", "stem.1."), (r"layer(\d)\.", "layers.{}.")],
}


def _rename(name: str, rules: list[tuple[str, str]], shift: int, where: str) -> str:
    for pattern, replacement in rules:
        match = re.match(pattern, name)
        if match:
            prefix = replacement.format(int(match.group(1)) + shift) if match.groups() else replacement
            return prefix + name[match.end() :]
    raise CheckpointError(f"{where}: tensor {name!r} has no torchvision counterpart")


def to_torchvision_names(state: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """A backbone's state dict (workers.models names) under torchvision's names."""
    return {_rename(k, _OURS[modality], 1, f"{modality} backbone"): v for k, v in state.items()}


def from_torchvision_names(state: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """The inverse of `to_torchvision_names`: names of workers.models' backbones."""
    return {_rename(k, _THEIRS[modality], -1, f"exported {modality} weights"): v for k, v in state.items()}


# --- reading the checkpoint and preparing every file ---------------------------------------------


def resolve_checkpoint(
    *, checkpoint: str | None, run_id: str | None, storage_root: str | None, endpoint_url: str = ""
) -> tuple[str, str]:
    """(checkpoint URI, its run folder or "") as `cmacc eval` picks it: `--run` is the run's
    newest registered checkpoint."""
    from workers.evaluate import run_folder_of

    if (checkpoint is None) == (run_id is None):
        raise UsageError("give exactly one of --checkpoint URI and --run ID")
    if run_id is not None:
        root = storage_root or Config().storage.root
        newest = catalog.newest_checkpoint_of(root, run_id, endpoint_url=endpoint_url)
        return storage.absolute(newest.uri), storage.absolute(layout.run_uri(root, run_id))
    checkpoint = storage.absolute(str(checkpoint)).rstrip("/")
    return checkpoint, run_folder_of(checkpoint, endpoint_url=endpoint_url)


def _read_record(run_uri: str, endpoint_url: str) -> dict[str, Any]:
    uri = storage.join(run_uri, layout.RUN_FILE) if run_uri else ""
    if not uri or not storage.exists(uri, endpoint_url=endpoint_url):
        return {}
    try:
        return json.loads(storage.read_bytes(uri, endpoint_url=endpoint_url))
    except ValueError as err:
        raise CheckpointError(f"{uri} is not valid JSON: {err}") from None


def dataset_facts(data_uri: str, *, endpoint_url: str = "") -> dict[str, Any]:
    """URI, number of clips and frame rate of a data set, as far as it is readable (None else)."""
    facts: dict[str, Any] = {"uri": data_uri or None, "num_clips": None, "frame_rate": None, "frame_rates": []}
    if not data_uri:
        return facts
    from workers.data.format import read_manifest, read_shard_columns

    budget = {"endpoint_url": endpoint_url, "retry_budget_s": DATA_RETRY_BUDGET_S}
    try:
        manifest = read_manifest(data_uri, **budget)
        facts["num_clips"] = manifest.num_clips
        rates: set[float] = set()
        for shard in manifest.shards[:FRAME_RATE_SHARDS] if manifest.has_video else []:
            fps = read_shard_columns(data_uri, shard, ["fps"], **budget).column("fps").to_pylist()
            rates.update(round(float(f), 3) for f in fps if f and f > 0)
        facts["frame_rates"] = sorted(rates)
        facts["frame_rate"] = next(iter(rates)) if len(rates) == 1 else None
    except (InputError, OSError, ValueError) as err:
        facts["unreadable"] = str(err)
    return facts


def _preprocessing(cfg: Any) -> dict[str, dict[str, Any]]:
    """What the evaluation transforms (train=False) of workers/data/transforms.py do."""
    from workers.data.transforms import build_transforms

    t = build_transforms(cfg, device=torch.device("cpu"), train=False)
    mel, num_samples = t.audio.mel, round(cfg.data.clip_seconds * cfg.data.sample_rate)
    return {
        "video": {
            "input": "uint8 RGB frames [T, H, W, 3] of the clip, at its stored frame rate",
            "window": f"the centred {t.video.frames} consecutive frames (fewer: the last one repeated)",
            "crop": f"the largest centred square, resized (bilinear) to {t.video.size} x {t.video.size}",
            "scale": "divide by 255 (values in [0, 1])",
            "mean": [round(float(x), 6) for x in t.video.mean.flatten()],
            "std": [round(float(x), 6) for x in t.video.std.flatten()],
            "clip_norm": bool(t.video.clip_norm),
            "clip_norm_means": VIDEO_CLIP_NORM[bool(t.video.clip_norm)],
            "layout": "float32 [B, 3, frames, frame_size, frame_size]",
        },
        "audio": {
            "input": f"mono float waveform in [-1, 1] at {t.audio.sample_rate} Hz, {cfg.data.clip_seconds:g} s "
            f"({num_samples} samples), centred on the video window",
            "transform": "torchaudio.transforms.MelSpectrogram",
            "sample_rate": int(t.audio.sample_rate),
            "n_mels": int(mel.n_mels),
            "hop_ms": float(cfg.model.audio.hop_ms),
            "hop_length": int(mel.hop_length),
            "win_length": int(mel.win_length),
            "n_fft": int(mel.n_fft),
            "window": "hann (torch.hann_window, periodic)",
            "center": bool(mel.spectrogram.center),
            "pad_mode": mel.spectrogram.pad_mode,
            "power": float(mel.power),
            "f_min": float(mel.mel_scale.f_min),
            "f_max": float(mel.mel_scale.f_max),
            "mel_scale": mel.mel_scale.mel_scale,
            "mel_norm": mel.mel_scale.norm,
            "log": "log(mel + 1e-6)",
            "clip_norm": bool(t.audio.clip_norm),
            "clip_norm_means": AUDIO_CLIP_NORM[bool(t.audio.clip_norm)],
            "num_frames": t.audio.num_frames(num_samples),
            "layout": "float32 [B, 1, n_mels, 1 + samples // hop_length]",
        },
    }


def _torchvision(modality: str, arch: str, width: float) -> dict[str, Any]:
    model = f"torchvision.models.{'video.' if modality == 'video' else ''}{arch}"
    changes = {"fc": "torch.nn.Identity()"} | ({"conv1": AUDIO_CONV1} if modality == "audio" else {})
    compatible = width == 1.0
    note = (
        f"tensor names and shapes are those of {model}() with these changes; unchanged, "
        "load_state_dict(strict=False) reports only fc.weight and fc.bias missing"
        if compatible
        else f"tensor names are torchvision's, but channel counts are scaled by width {width:g} (64..512 x "
        f"{width:g}, rounded to multiples of 8): torchvision's classes do not fit; use workers.export.load_exported"
    )
    return {"compatible": compatible, "model": model, "changes": changes, "note": note}


def prepare_export(
    *,
    checkpoint: str | None = None,
    run_id: str | None = None,
    storage_root: str | None = None,
    modalities: tuple[str, ...] = MODALITIES,
    with_heads: bool = False,
    out: str = "",
    endpoint_url: str = "",
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Read and check the checkpoint and build every file of the export in memory (nothing is
    written): (file name -> bytes, a summary). Refuses an unknown run, a missing or
    unregistered checkpoint."""
    from workers.evaluate import checkpoint_config, load_query_encoders

    if not modalities or not set(modalities) <= set(MODALITIES):
        raise UsageError(f"modalities {modalities!r}: choose among {', '.join(MODALITIES)}")
    uri, run_uri = resolve_checkpoint(
        checkpoint=checkpoint, run_id=run_id, storage_root=storage_root, endpoint_url=endpoint_url
    )
    cfg, meta = checkpoint_config(uri, endpoint_url=endpoint_url)  # registered, readable, its config
    model = load_query_encoders(uri, cfg, endpoint_url=endpoint_url)
    record = _read_record(run_uri, endpoint_url)
    data = dataset_facts(record.get("data") or cfg.data.uri, endpoint_url=endpoint_url)
    prep = _preprocessing(cfg)
    files: dict[str, bytes] = {}
    run = str(meta.get("run_id") or record.get("run_id") or run_id or "")
    summary = {"checkpoint": uri, "run_id": run, "step": int(meta.get("step", -1)), "modalities": list(modalities)}
    summary |= {"with_heads": with_heads, "torchvision_compatible": {}}
    source = {"run_id": run, "checkpoint": uri, "step": summary["step"], "recipe": cfg.recipe, "data": data}
    source |= {"evaluation": record.get("eval"), "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    infos = {}
    for modality in modalities:
        encoder = getattr(model, modality)
        mcfg = getattr(cfg.model, modality)
        tensors = to_torchvision_names(encoder.backbone.state_dict(), modality)
        if with_heads:
            tensors |= {HEAD_PREFIX + k: v for k, v in encoder.head.state_dict().items()}
        tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        tv = _torchvision(modality, mcfg.arch, mcfg.width)
        summary["torchvision_compatible"][modality] = tv["compatible"]
        metadata = {"format": "pt", "cmacc_export": EXPORT_FORMAT, "modality": modality, "architecture": mcfg.arch}
        files[weights_name(modality)] = save_safetensors(tensors, metadata=metadata)
        input_facts = (
            {"frames": mcfg.frames, "frame_size": mcfg.size, "frame_rate": data["frame_rate"]}
            if modality == "video"
            else {"sample_rate": cfg.data.sample_rate, "clip_seconds": cfg.data.clip_seconds}
        )
        infos[modality] = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "modality": modality,
            "weights": weights_name(modality),
            "tensor_names": "torchvision",
            "num_tensors": len(tensors),
            "architecture": mcfg.arch,
            "width": mcfg.width,
            "feature_dim": encoder.backbone.out_features,
            "features": "the pooled backbone output (mean over time and space), [B, feature_dim]",
            "embed_dim": cfg.model.embed_dim,
            "head_hidden": cfg.model.head_hidden,
            "head_norm": cfg.model.head_norm,
            "head_included": with_heads,
            "head": HEAD_NOTE if with_heads else "not exported (use --with-heads)",
            "torchvision": tv,
            **input_facts,
            "clip_norm": mcfg.clip_norm,
            "preprocessing": prep[modality],
            "source": source,
        }
        files[info_name(modality)] = json.dumps(infos[modality], indent=2).encode()
    files[CARD_NAME] = model_card(files, infos, cfg, source, out=out).encode()
    return files, summary


# --- the model card ---------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


def usage_lines(out: str, modality: str = "video") -> list[str]:
    """The three lines that load an export with this project."""
    shape = "clips: float32 [B, 3, frames, size, size]" if modality == "video" else "log_mel: float32 [B, 1, n_mels, T]"
    return [
        "from workers.export import load_exported",
        f"encoders = load_exported({json.dumps(out)})",
        f'features = encoders["{modality}"]({shape.split(":")[0]})  # {shape}, as {info_name(modality)} says',
    ]


def _torchvision_lines(modality: str, info: dict[str, Any]) -> list[str]:
    name = modality
    lines = [f"{name} = {info['torchvision']['model']}()"]
    if modality == "audio":
        lines.append(f"{name}.conv1 = {AUDIO_CONV1}")
    lines.append(f"{name}.fc = torch.nn.Identity()")
    weights = f'load_file("{weights_name(modality)}")'
    if info["head_included"]:
        lines.append(f'weights = {{k: v for k, v in {weights}.items() if not k.startswith("{HEAD_PREFIX}")}}')
        weights = "weights"
    return [*lines, f"{name}.load_state_dict({weights})", f"{name}.eval()"]


def model_card(files: dict[str, bytes], infos: dict[str, Any], cfg: Any, source: dict[str, Any], *, out: str) -> str:
    data, method = source["data"], cfg.method
    clips = f" ({data['num_clips']} clips)" if data["num_clips"] is not None else " (its manifest was not readable)"
    lines = [
        f"# CM-ACC encoders: run {source['run_id'] or '(none)'}, step {source['step']}",
        "",
        f"Exported {source['exported']} by `cmacc export` from the checkpoint `{source['checkpoint']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| recipe | {cfg.recipe} |",
        f"| steps | {source['step']} of {cfg.train.steps} (train.steps), M = {cfg.global_batch_size} clips per step |",
        f"| sampler | {method.sampler} |",
        f"| pool | {method.pool}: N = {cfg.pool_capacity} candidates, P = {cfg.enqueue_per_step} keys per step, "
        f"dictionary K = {method.dictionary_size} |",
        f"| data set | `{data['uri']}`{clips} |" if data["uri"] else "| data set | not recorded |",
        "",
        "## Encoders",
        "",
        "| modality | weights | architecture | width | features | torchvision |",
        "|---|---|---|---|---|---|",
    ]
    for modality, info in infos.items():
        tv = info["torchvision"]
        fits = f"`{tv['model']}` ({', '.join(f'{k} = {v}' for k, v in tv['changes'].items())})"
        fits = fits if tv["compatible"] else "names only: torchvision's classes do not fit this width"
        size = _size(len(files[weights_name(modality)]))
        lines.append(
            f"| {modality} | `{info['weights']}` ({size}, {info['num_tensors']} tensors"
            f"{', with head' if info['head_included'] else ''}) | {info['architecture']} | {info['width']} | "
            f"{info['feature_dim']} | {fits} |"
        )
    exported_head = "exported under `head.`" if any(i["head_included"] for i in infos.values()) else "not exported"
    lines += [
        "",
        f"Heads: 2-layer MLP, hidden size {cfg.model.head_hidden}, embedding size {cfg.model.embed_dim}, "
        f"norm {cfg.model.head_norm} ({exported_head}).",
    ]
    if "audio" in infos:
        lines.append(
            f"The audio model is torchvision's `resnet18` with `conv1 = {AUDIO_CONV1}` (one input channel: "
            "a log-mel spectrogram)."
        )
    lines += ["", "## Inputs (the evaluation transforms)", ""]
    if "video" in infos:
        p, info = infos["video"]["preprocessing"], infos["video"]
        rate = f"{info['frame_rate']:g} fps" if info["frame_rate"] else "unknown frame rate"
        lines.append(
            f"* video: {info['frames']} frames ({rate}), {p['crop']}; {p['scale']}; minus mean {p['mean']}, divided "
            f"by std {p['std']}; clip_norm {p['clip_norm']} ({p['clip_norm_means']}); {p['layout']}."
        )
    if "audio" in infos:
        p = infos["audio"]["preprocessing"]
        lines.append(
            f"* audio: {p['input']}; MelSpectrogram(sample_rate={p['sample_rate']}, n_fft={p['n_fft']}, "
            f"win_length={p['win_length']}, hop_length={p['hop_length']} ({p['hop_ms']:g} ms), n_mels={p['n_mels']}, "
            f"power=2, centred, hann window); {p['log']}; clip_norm {p['clip_norm']} ({p['clip_norm_means']}); "
            f"{p['layout']} ({p['num_frames']} frames)."
        )
    lines += ["", "## Probe results", ""]
    evaluation = source["evaluation"]
    if evaluation and evaluation.get("top1"):
        lines += [
            f"The run's newest evaluation (step {evaluation.get('step')}, run.json), top-1 accuracy:",
            "",
            "| modality/probe | untrained | pretrained |",
            "|---|---|---|",
        ]
        for name, result in evaluation["top1"].items():
            lines.append(f"| {name} | {result.get('untrained', 0):.3f} | {result.get('pretrained', 0):.3f} |")
    else:
        lines.append("The run record holds no evaluation.")
    lines += [
        "",
        "## Loading",
        "",
        "With this project (`cmacc`):",
        "",
        "```python",
        *usage_lines(out, next(iter(infos))),
        "```",
    ]
    compatible = [m for m in infos if infos[m]["torchvision"]["compatible"]]
    if compatible:
        lines += ["", "With torchvision alone (in this folder):", "", "```python", "import torch", "import torchvision"]
        lines += ["from safetensors.torch import load_file", ""]
        for modality in compatible:
            lines += [*_torchvision_lines(modality, infos[modality]), ""]
        lines[-1] = "```"
    return "\n".join(lines) + "\n"


# --- writing ------------------------------------------------------------------------------------


def export(*, out: str, endpoint_url: str = "", **request: Any) -> dict[str, Any]:
    """Prepare everything (`prepare_export`), then write it under `out`: the weights first, the
    card last. Returns what was written (URIs and sizes)."""
    given, out = out, storage.absolute(out).rstrip("/")
    if storage.is_local(out) and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    files, summary = prepare_export(out=given, endpoint_url=endpoint_url, **request)
    written = []
    for name in sorted(files, key=lambda name: (name == CARD_NAME, not name.endswith(".safetensors"), name)):
        uri = storage.join(out, name)
        storage.write_bytes(uri, files[name], endpoint_url=endpoint_url)
        written.append({"name": name, "uri": uri, "bytes": len(files[name])})
    return {"out": out, **summary, "files": written, "load": usage_lines(given, summary["modalities"][0])}


# --- loading ------------------------------------------------------------------------------------


class ExportedEncoders(dict):
    """modality -> backbone module (eval mode; its forward gives the pooled features).
    `info`: modality -> its JSON; `heads`: modality -> projection head (exports with heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.info: dict[str, dict[str, Any]] = {}
        self.heads: dict[str, nn.Module] = {}


def build_backbone(info: dict[str, Any]) -> nn.Module:
    """An empty backbone of an export's JSON: torchvision's model where it fits, else ours."""
    modality, arch, width = info["modality"], info["architecture"], float(info["width"])
    if info["torchvision"]["compatible"]:
        import torchvision

        if modality == "video":
            model = getattr(torchvision.models.video, arch)()
        else:
            model = getattr(torchvision.models, arch)()
            model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        model.fc = nn.Identity()
        return model
    return VideoBackbone(arch=arch, width=width) if modality == "video" else AudioBackbone(width=width)


def _loaded(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """`model` (built on the meta device) holding `weights`, every one of its tensors, in eval mode."""
    model.load_state_dict(weights, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CheckpointError(f"exported weights leave tensors of {type(model).__name__} unset")
    return model.eval()


def load_exported(path_or_uri: str, modality: str | None = None, *, endpoint_url: str = "") -> ExportedEncoders:
    """The encoders of an export folder (or URI), ready (eval mode, on the CPU), without the
    project's checkpoint code: `encoders["video"](clips)` gives the pooled features."""
    root = storage.absolute(path_or_uri).rstrip("/")
    if modality is not None and modality not in MODALITIES:
        raise UsageError(f"modality {modality!r}: choose from {', '.join(MODALITIES)}")
    wanted = [modality] if modality else MODALITIES
    found = [m for m in wanted if storage.exists(storage.join(root, info_name(m)), endpoint_url=endpoint_url)]
    if not found or (modality and modality not in found):
        names = " or ".join(info_name(m) for m in wanted)
        raise CheckpointError(f"{root} holds no exported encoder (no {names})")
    encoders = ExportedEncoders()
    for name in found:
        info_uri = storage.join(root, info_name(name))
        info = json.loads(storage.read_bytes(info_uri, endpoint_url=endpoint_url))
        if info.get("format") != EXPORT_FORMAT:
            raise CheckpointError(f"{info_uri} is not a {EXPORT_FORMAT} file")
        tensors = load_safetensors(storage.read_bytes(storage.join(root, info["weights"]), endpoint_url=endpoint_url))
        head = {k.removeprefix(HEAD_PREFIX): v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        weights = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            model = build_backbone(info)
        if not info["torchvision"]["compatible"]:
            weights = from_torchvision_names(weights, name)
        encoders[name] = _loaded(model, weights)
        encoders.info[name] = info
        if head:
            sizes = {
                "in_features": info["feature_dim"],
                "hidden": info["head_hidden"],
                "out_features": info["embed_dim"],
            }
            with torch.device("meta"):
                projection = ProjectionHead(**sizes, norm=info["head_norm"])
            encoders.heads[name] = _loaded(projection, head)
    return encoders
