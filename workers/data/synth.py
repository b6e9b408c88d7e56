"""Procedural audio-visual clips whose sound and picture share hidden factors.

* The class sets the shape in the picture and the timbre (pitch and harmonics) of the sound.
* An instance's speed and phase set both the motion of the shape (one orbit per beat) and
  the rhythm of the sound (one note per beat), so the modalities agree in time too.
* Colours, background texture and size are distractors only the picture sees; loudness,
  pitch jitter and the noise floor are distractors only the sound hears. Both get noise.
* The shape is large (a radius of a fifth to a quarter of the frame), stands out from the
  background by at least 60 levels per channel, and the background stripes are faint: at the
  demo's 40 x 40 crops of 48 x 48 frames a width-0.125 R3D-18 can then tell the shapes apart
  (with labels, a linear probe reaches 0.55 after 300 steps; with smaller shapes over strong
  stripes and colours that could match the background it stayed at chance).

Deterministic per (seed, clip index) and quick: the default data of the demo and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from service.config import DataConfig
from workers.data.format import Clip, DatasetWriter, Manifest, encode_jpeg, encode_pcm

VERSION = 3  # bumped whenever the same parameters make different rows (cached data sets key on it)
DEFAULTS = DataConfig()  # the generated set's parameters by default: the run config's, in one place
SHAPES = ("circle", "square", "diamond", "triangle", "cross", "ring", "hbar", "vbar")
TEST_FRACTION = 0.2
ORBIT = 0.2  # radius of the shape's orbit, in frame widths
TEXTURE_CONTRAST = 12.0  # amplitude of the background stripes, in 8-bit levels
NUM_HARMONICS = 6


def class_names(num_classes: int) -> list[str]:
    return [f"{SHAPES[c % len(SHAPES)]}-{c // len(SHAPES)}" for c in range(num_classes)]


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit shape; dx, dy are offsets from its centre in radii."""
    if shape == 0:
        return dx**2 + dy**2 < 1.0
    if shape == 1:
        return np.maximum(np.abs(dx), np.abs(dy)) < 0.85
    if shape == 2:
        return np.abs(dx) + np.abs(dy) < 1.1
    if shape == 3:
        return (dy > -0.9) & (dy < 0.9) & (np.abs(dx) < (dy + 0.9) / 1.8)
    if shape == 4:
        return ((np.abs(dx) < 0.3) & (np.abs(dy) < 1.0)) | ((np.abs(dy) < 0.3) & (np.abs(dx) < 1.0))
    if shape == 5:
        r2 = dx**2 + dy**2
        return (r2 < 1.0) & (r2 > 0.3)
    if shape == 6:
        return (np.abs(dx) < 1.1) & (np.abs(dy) < 0.35)
    return (np.abs(dy) < 1.1) & (np.abs(dx) < 0.35)


def _timbre(label: int) -> tuple[float, np.ndarray]:
    """Fundamental (Hz) and harmonic weights of a class; the same for every seed."""
    f0 = 150.0 * 1.25 ** (label % len(SHAPES))
    weights = np.random.default_rng(1234 + label).dirichlet(np.full(NUM_HARMONICS, 0.6))
    return f0, weights


def render(
    index: int,
    *,
    seed: int,
    num_classes: int,
    frames: int,
    size: int,
    seconds: float,
    sample_rate: int,
) -> dict[str, Any]:
    """One clip as arrays: `frames` (T x H x W x 3 uint8), `audio` (float32 in [-1, 1]),
    `label`, `split`, `fps`."""
    rng = np.random.default_rng([seed, index])
    label = index % num_classes
    shape = label % len(SHAPES)
    striped = (label // len(SHAPES)) % 2 == 1
    speed = rng.uniform(0.75, 2.5)  # beats (orbits) per second: shared by both modalities
    phase = rng.uniform(0, 2 * np.pi)
    direction = rng.choice([-1.0, 1.0])
    fps = frames / seconds

    # Picture: the shape orbits the centre once per beat over a faintly textured background.
    t = np.arange(frames, dtype=np.float64) / fps
    angle = 2 * np.pi * speed * t + phase
    cx = 0.5 + ORBIT * np.cos(angle)
    cy = 0.5 + ORBIT * direction * np.sin(angle)
    radius = rng.uniform(0.2, 0.26)
    grid = (np.arange(size) + 0.5) / size
    dx = (grid[None, None, :] - cx[:, None, None]) / radius
    dy = (grid[None, :, None] - cy[:, None, None]) / radius
    mask = _shape_mask(shape, dx, dy)
    if striped:
        mask &= np.sin(dx * 6.0) > -0.2
    background = rng.uniform(40, 215, size=3)
    texture_freq = rng.uniform(2, 8, size=2)
    texture = np.sin(2 * np.pi * (texture_freq[0] * grid[None, :] + texture_freq[1] * grid[:, None]))
    # The shape stands out by 60 to 120 levels in every channel, away from the nearer extreme.
    fg = background + np.where(background < 128, 1.0, -1.0) * rng.uniform(60, 120, size=3)
    video = background + TEXTURE_CONTRAST * texture[None, :, :, None] * np.ones((frames, 1, 1, 3))
    video = np.where(mask[..., None], fg, video)
    video += rng.normal(0, 8.0, size=video.shape)
    video = np.clip(video, 0, 255).astype(np.uint8)

    # Sound: one note per beat, class timbre, random loudness and noise floor.
    f0, weights = _timbre(label)
    f0 *= rng.uniform(0.97, 1.03)
    ts = np.arange(round(seconds * sample_rate), dtype=np.float64) / sample_rate
    tone = sum(w * np.sin(2 * np.pi * (k + 1) * f0 * ts) for k, w in enumerate(weights))
    envelope = ((1 + np.cos(2 * np.pi * speed * ts + phase)) / 2) ** 3
    audio = rng.uniform(0.3, 0.8) * envelope * tone + rng.normal(0, rng.uniform(0.01, 0.05), size=ts.shape)
    audio = np.clip(audio, -1, 1).astype(np.float32)

    split = "test" if rng.random() < TEST_FRACTION else "train"
    return {"frames": video, "audio": audio, "label": label, "split": split, "fps": fps}


def synth_clips(
    num_clips: int,
    *,
    seed: int = 0,
    num_classes: int = DEFAULTS.num_classes,
    frames: int = DEFAULTS.frames,
    size: int = DEFAULTS.size,
    seconds: float = DEFAULTS.clip_seconds,
    sample_rate: int = DEFAULTS.sample_rate,
) -> Iterator[Clip]:
    """The clips of a generated data set, in order, as rows of the shard format."""
    for index in range(num_clips):
        arrays = render(
            index,
            seed=seed,
            num_classes=num_classes,
            frames=frames,
            size=size,
            seconds=seconds,
            sample_rate=sample_rate,
        )
        yield Clip(
            clip_id=f"synth-{seed}-{index:07d}",
            source=f"synth://seed-{seed}/{index:07d}",  # each clip its own recording
            start_s=0.0,
            fps=float(arrays["fps"]),
            frames=[encode_jpeg(frame) for frame in arrays["frames"]],
            height=size,
            width=size,
            audio=encode_pcm(arrays["audio"]),
            sample_rate=sample_rate,
            label=int(arrays["label"]),
            split=arrays["split"],
        )


def write_synthetic(
    uri: str,
    num_clips: int,
    *,
    seed: int = 0,
    num_classes: int = DEFAULTS.num_classes,
    frames: int = DEFAULTS.frames,
    size: int = DEFAULTS.size,
    seconds: float = DEFAULTS.clip_seconds,
    sample_rate: int = DEFAULTS.sample_rate,
    target_shard_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
    endpoint_url: str = "",
) -> Manifest:
    """Generate a data set at `uri`. `progress(n)` is called after each clip."""
    params = {
        "num_clips": num_clips,
        "seed": seed,
        "num_classes": num_classes,
        "frames": frames,
        "size": size,
        "seconds": seconds,
        "sample_rate": sample_rate,
    }
    extra = {} if target_shard_bytes is None else {"target_shard_bytes": target_shard_bytes}
    writer = DatasetWriter(
        uri,
        label_names=class_names(num_classes),
        made_by={"generator": "synth", "version": VERSION, "source": "procedural", "params": params},
        endpoint_url=endpoint_url,
        **extra,
    )
    for clip in synth_clips(
        num_clips,
        seed=seed,
        num_classes=num_classes,
        frames=frames,
        size=size,
        seconds=seconds,
        sample_rate=sample_rate,
    ):
        writer.add(clip)
        if progress is not None:
            progress(1)
    return writer.close()
