"""AV-digits: real spoken digits paired with real handwritten digits moving over a background.

Each clip pairs one recording of the Free Spoken Digit Dataset (8 kHz WAV, resampled to
16 kHz, placed in or cut to the clip) with a UCI handwritten image of the same digit
(8x8, 0..16, upscaled) that moves in a straight line over a textured background. The
digit is the only factor both modalities share; voice, loudness, colours, texture and
motion are distractors that only one of them sees.

The split is speaker-disjoint: every recording of `test_speaker` is `test`, the others
`train`. The handwritten images are split too (a fixed share of each digit's images only
appears in test clips), so test clips are new to both modalities. Deterministic per seed.

Two variants (`sync`, recorded in the manifest's parameters):

* `none` (class-only, the harder benchmark): the digit is all the two streams share. At
  random initialisation the encoders' features share no linear signal across the
  modalities on it, so the cross-modal loss has nothing to start from.
* `scale`, `ink` or `both` (synchronised): the picture also moves with the sound, as lips
  move with speech. The digit's size (`scale`), its ink (`ink`) or both follow the loudness
  envelope of the clip's recording: frame t shows the RMS level of the audio samples it
  spans, in dB below the clip's loudest frame (`FLOOR_DB` and quieter count as silence).
  The envelope is relative, so it carries timing, not the speaker's recording level.
* `spectral` (synchronised, like lips that shape each sound): the digit's width follows the
  level of the low band (voicing, vowels) and its height the level of the high band
  (fricatives such as the s of six and seven, the f of four and five), frame by frame, both
  in dB below the clip's loudest band-frame. What the picture shares with the sound then
  depends on the word said, not only on when it is said.

Redundancy (`redundancy`, off by default, recorded in the manifest's parameters as
`{"head": {"digit": D, "copies": R} or null, "clips": K}` or null): the regime where the
CM-ACC paper finds that MoCo "can suffer when there is high redundancy in the data" and
that active sampling of the dictionary helps. Only the train split is repeated; the test
split keeps exactly the clips (ids, rows, bytes) of the set made without redundancy, so
results on it stay comparable.

* `head=D:R`: a head class. Every train recording of digit D gives R clips, so the train
  split holds R times as many clips of D as before and the other digits are unchanged.
* `clips=K`: every train recording gives K clips. Combined (`head=D:R,clips=K`), D's
  recordings give R x K clips each and the others K, so D stays R times as common.

The copies of a recording are near-duplicates: the same recording and the same
handwritten image over the same background and ink; only the digit's path across the
frame, the frame noise, the audio's peak level and its placement in the clip (or, for a
recording longer than the clip, another window holding at least `JITTER_ENERGY` of the
loudest one's energy) are drawn anew per copy. Copy 0 is the clip made without redundancy;
copy c > 0 has the id `avdigits-{digit}_{speaker}_{take}-c{c}`. All clips of a train
recording share the `source` `fsdd:{file name}` (without redundancy, and in the test split,
it stays `fsdd:{file name}+digits:{image index}`). The extra copies are spread over the file
at seeded random places, so that a bounded shuffle buffer does not see them side by side.
"""

from __future__ import annotations

import gzip
import itertools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import storage
from workers.data.audio_folders import decode_audio
from workers.data.format import Clip, DataError, DatasetWriter, Manifest, encode_jpeg, encode_pcm

LABEL_NAMES = [str(d) for d in range(10)]
TEST_IMAGE_FRACTION = 0.2  # share of each digit's images kept for test clips
DIGIT_SCALE = 0.5  # side of the upscaled digit, as a fraction of the frame side
PEAK_LEVEL = (0.3, 0.9)  # range of the random peak amplitude of each clip's recording
SYNC_MODES = ("none", "scale", "ink", "both", "spectral")
SPECTRAL_BANDS_HZ = ((50.0, 700.0), (1500.0, 4000.0))  # voicing and low formants; fricatives and high formants
FLOOR_DB = 30.0  # a frame this far below the clip's loudest one counts as silent
SYNC_SCALE = (0.25, 0.6)  # digit side (fraction of the frame side) when silent and at the loudest frame
SYNC_INK = (0.15, 1.0)  # digit opacity when silent and at the loudest frame
JITTER_ENERGY = 0.9  # a copy's window of a long recording holds this share of the loudest window's energy
MAX_COPIES = 64  # clips per recording at most: guards against a typo making a huge set
_FSDD_NAME = re.compile(r"^(?P<digit>\d)_(?P<speaker>[a-z]+)_(?P<take>\d+)\.wav$")


@dataclass(kw_only=True, frozen=True)
class Recording:
    """One FSDD recording, `{digit}_{speaker}_{take}.wav`."""

    path: str
    digit: int
    speaker: str
    take: int


def find_recordings(fsdd_dir: str) -> list[Recording]:
    """The FSDD recordings in `fsdd_dir` (or in its `recordings/` folder)."""
    folder = os.path.join(fsdd_dir, "recordings")
    if not os.path.isdir(folder):
        folder = fsdd_dir
    if not os.path.isdir(folder):
        raise DataError(f"{fsdd_dir}: FSDD folder not found")
    recordings = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".wav"):
            continue
        match = _FSDD_NAME.match(name)
        if match is None:
            raise DataError(f"{os.path.join(folder, name)}: not an FSDD name {{digit}}_{{speaker}}_{{take}}.wav")
        recordings.append(
            Recording(
                path=os.path.join(folder, name),
                digit=int(match["digit"]),
                speaker=match["speaker"],
                take=int(match["take"]),
            )
        )
    if not recordings:
        raise DataError(f"{folder}: no FSDD recordings (*.wav)")
    return recordings


def read_digit_images(digits_csv: str) -> tuple[np.ndarray, np.ndarray]:
    """UCI handwritten digits: images (N x 8 x 8 float32 in 0..1) and labels (N int64), from a
    CSV (optionally gzipped, any URI) of 64 pixel values 0..16 followed by the label."""
    raw = storage.read_bytes(digits_csv)
    if digits_csv.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{digits_csv}: not a readable gzip file ({err})") from None
    try:
        table = np.loadtxt(raw.decode().splitlines(), delimiter=",", ndmin=2)
    except ValueError as err:
        raise DataError(f"{digits_csv}: not a CSV of numbers ({err})") from None
    if table.shape[1] != 65:
        raise DataError(f"{digits_csv}: expected 65 columns (64 pixels, label), got {table.shape[1]}")
    pixels, labels = table[:, :64], table[:, 64].astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 16 or not set(labels.tolist()) <= set(range(10)):
        raise DataError(f"{digits_csv}: pixels must be 0..16 and labels 0..9")
    return (pixels / 16.0).reshape(-1, 8, 8).astype(np.float32), labels


def _image_pools(labels: np.ndarray, *, seed: int) -> dict[tuple[str, int], np.ndarray]:
    """Indices of the images each (split, digit) may draw from; test and train disjoint."""
    rng = np.random.default_rng([seed, 8])
    pools = {}
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(labels == digit))
        if indices.size < 2:
            raise DataError(f"the digit images hold {indices.size} image(s) of {digit}; need at least 2")
        num_test = max(1, round(TEST_IMAGE_FRACTION * indices.size))
        pools["test", digit] = indices[:num_test]
        pools["train", digit] = indices[num_test:]
    return pools


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An 8x8 image in 0..1 resized to height x width with bilinear interpolation."""
    from PIL import Image

    resized = Image.fromarray(image.astype(np.float32)).resize((width, height), Image.BILINEAR)
    return np.asarray(resized).clip(0.0, 1.0)


def _upscale(image: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 image in 0..1 resized to side x side with bilinear interpolation."""
    from PIL import Image

    return np.asarray(Image.fromarray(image.astype(np.float32)).resize((side, side), Image.BILINEAR)).clip(0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background [size, size, 3] in 0..1 and an ink colour [3] that contrasts with it."""
    grid = (np.arange(size) + 0.5) / size
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(2, 6)
    along = np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]
    texture = 0.5 + 0.25 * np.sin(2 * np.pi * freq * along) + 0.1 * rng.standard_normal((size, size))
    background = rng.uniform(0.2, 0.8, size=3)[None, None, :] * (0.6 + 0.8 * texture[:, :, None])
    # The digit's colour contrasts with the background's brightness, so it stays visible.
    bright = float(background.mean()) < 0.5
    ink = rng.uniform(0.75, 1.0, size=3) if bright else rng.uniform(0.0, 0.25, size=3)
    return background, ink


def render_frames(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    frames: int,
    size: int,
    scene: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """T x size x size x 3 uint8: the digit moving in a straight line over a textured background
    (`scene`, a `_background` (background, ink), or drawn from `rng` first)."""
    background, ink = _background(rng, size) if scene is None else scene
    side = max(8, round(DIGIT_SCALE * size))
    alpha = _upscale(image, side)[:, :, None]
    start, end = rng.uniform(0, size - side, size=(2, 2))
    video = np.empty((frames, size, size, 3), dtype=np.float32)
    for t in range(frames):
        x, y = np.round(start + (end - start) * (t / max(frames - 1, 1))).astype(int)
        frame = background.copy()
        patch = frame[y : y + side, x : x + side]
        frame[y : y + side, x : x + side] = (1 - alpha) * patch + alpha * ink
        video[t] = frame + 0.02 * rng.standard_normal(frame.shape)
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def loudness_envelope(audio: np.ndarray, frames: int, *, floor_db: float = FLOOR_DB) -> np.ndarray:
    """[frames] levels in [0, 1]: frame t covers samples [t S / frames, (t + 1) S / frames) of
    `audio` (S samples, the clip's span); its RMS in dB relative to the loudest frame, with
    -floor_db and below mapped to 0 and the loudest frame to 1."""
    bounds = (np.arange(frames + 1) * audio.size) // frames
    rms = np.array(
        [
            np.sqrt(np.mean(np.square(audio[a:b], dtype=np.float64))) if b > a else 0.0
            for a, b in itertools.pairwise(bounds)
        ]
    )
    peak = float(rms.max()) if rms.size else 0.0
    if peak <= 0:
        return np.zeros(frames, dtype=np.float32)
    level_db = 20 * np.log10(np.maximum(rms / peak, 1e-10))
    return np.clip(1 + level_db / floor_db, 0.0, 1.0).astype(np.float32)


def band_envelopes(audio: np.ndarray, frames: int, *, sample_rate: int, floor_db: float = FLOOR_DB) -> np.ndarray:
    """[frames, 2] levels in [0, 1] of the low and the high band of `SPECTRAL_BANDS_HZ`: the
    RMS of each frame's samples (as `loudness_envelope` splits them) in each band, in dB
    relative to the loudest band-frame of the clip, -floor_db and below mapped to 0."""
    bounds = (np.arange(frames + 1) * audio.size) // frames
    rms = np.zeros((frames, len(SPECTRAL_BANDS_HZ)))
    for t, (a, b) in enumerate(itertools.pairwise(bounds)):
        if b - a < 2:
            continue
        power = np.abs(np.fft.rfft(audio[a:b].astype(np.float64))) ** 2
        hz = np.fft.rfftfreq(b - a, d=1.0 / sample_rate)
        for band, (lo, hi) in enumerate(SPECTRAL_BANDS_HZ):
            rms[t, band] = np.sqrt(power[(hz >= lo) & (hz < hi)].sum() / (b - a) ** 2)
    peak = float(rms.max())
    if peak <= 0:
        return np.zeros((frames, len(SPECTRAL_BANDS_HZ)), dtype=np.float32)
    level_db = 20 * np.log10(np.maximum(rms / peak, 1e-10))
    return np.clip(1 + level_db / floor_db, 0.0, 1.0).astype(np.float32)


def render_synced_frames(
    image: np.ndarray,
    envelope: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    mode: str,
    scene: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """T x size x size x 3 uint8 (T = len(envelope)): the digit moving in a straight line over
    a textured background (as `render_frames`), following `envelope` frame by frame: its size
    (`scale`), ink (`ink`) or both with a loudness envelope [T]; its width and height with
    the two band envelopes [T, 2] (`spectral`)."""
    if mode not in SYNC_MODES[1:]:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES[1:])} here, got {mode!r}")
    levels = envelope.reshape(len(envelope), -1)  # T x 1 (loudness) or T x 2 (low band, high band)
    background, ink = _background(rng, size) if scene is None else scene
    low, high = SYNC_SCALE if mode in ("scale", "both", "spectral") else (DIGIT_SCALE, DIGIT_SCALE)
    largest = max(8, round(high * size))
    start, end = rng.uniform(largest / 2, size - largest / 2, size=(2, 2))  # the path of the digit's centre
    video = np.empty((len(levels), size, size, 3), dtype=np.float32)
    for t, frame_levels in enumerate(levels.tolist()):
        width_level, height_level = frame_levels[0], frame_levels[-1]
        width = max(8, round((low + (high - low) * width_level) * size))
        height = max(8, round((low + (high - low) * height_level) * size))
        alpha = _resize(image, width, height)[:, :, None]
        if mode in ("ink", "both"):
            alpha = alpha * (SYNC_INK[0] + (SYNC_INK[1] - SYNC_INK[0]) * width_level)
        cx, cy = start + (end - start) * (t / max(len(levels) - 1, 1))
        x = int(np.clip(round(cx - width / 2), 0, size - width))
        y = int(np.clip(round(cy - height / 2), 0, size - height))
        frame = background.copy()
        patch = frame[y : y + height, x : x + width]
        frame[y : y + height, x : x + width] = (1 - alpha) * patch + alpha * ink
        video[t] = frame + 0.02 * rng.standard_normal(frame.shape)
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def fit_audio(wave: np.ndarray, rng: np.random.Generator, *, num_samples: int, jitter: bool = False) -> np.ndarray:
    """A recording scaled to a random peak level, then placed at a random offset in
    `num_samples` of silence or, when longer, cut to its loudest `num_samples` (where the
    spoken digit is) or, with `jitter`, to a random window holding at least `JITTER_ENERGY`
    of the loudest one's energy."""
    # FSDD speakers recorded at very different levels (theo's median peak is 0.03, jackson's
    # 0.43): a random level per clip keeps loudness from telling speakers, and so splits, apart.
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    wave = wave * (rng.uniform(*PEAK_LEVEL) / peak) if peak > 0 else wave
    if wave.size <= num_samples:
        out = np.zeros(num_samples, dtype=np.float32)
        offset = int(rng.integers(0, num_samples - wave.size + 1))
        out[offset : offset + wave.size] = wave
        return out
    energy = np.concatenate([[0.0], np.cumsum(wave.astype(np.float64) ** 2)])
    window = energy[num_samples:] - energy[:-num_samples]
    if jitter:
        first = int(rng.choice(np.flatnonzero(window >= JITTER_ENERGY * window.max())))
    else:
        first = int(np.argmax(window))
    return wave[first : first + num_samples].astype(np.float32)


def parse_redundancy(spec: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The redundancy as the manifest records it, {"head": {"digit": D, "copies": R} or None,
    "clips": K}, or None when off, from a spec (`head=D:R`, `clips=K` or both, comma-separated,
    e.g. `head=0:8,clips=2`; `none` or empty: off) or from such a dict. ValueError saying what
    is wrong otherwise: R and K are whole numbers >= 2, D a digit 0..9, each kind at most once,
    and at most `MAX_COPIES` clips per recording."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    if isinstance(spec, Mapping):
        head, clips = spec.get("head"), spec.get("clips", 1)
        if set(spec) - {"head", "clips"} or not (head is None or isinstance(head, Mapping)):
            raise ValueError(f"expected {{'head': {{'digit': D, 'copies': R}} or None, 'clips': K}}, got {spec!r}")
        text = [] if head is None else [f"head={head.get('digit')}:{head.get('copies')}"]
        spec = ",".join([*text, *([] if clips == 1 else [f"clips={clips}"])]) or "clips=1"
    given: dict[str, str] = {}
    for part in spec.split(","):
        kind, sep, value = part.strip().partition("=")
        if not sep or kind not in ("head", "clips") or not value:
            raise ValueError(f"expected head=D:R and/or clips=K, comma-separated (e.g. head=0:8,clips=2); got {part!r}")
        if kind in given:
            raise ValueError(f"{kind} given twice")
        given[kind] = value

    def count(text: str, what: str) -> int:
        if not text.strip().isdecimal() or int(text) < 2:
            raise ValueError(f"{what} must be a whole number >= 2, got {text!r}")
        return int(text)

    head = None
    if "head" in given:
        digit, sep, copies = given["head"].partition(":")
        if not sep or digit.strip() not in LABEL_NAMES:
            raise ValueError(f"head must be D:R with a digit D in 0..9, got {given['head']!r}")
        head = {"digit": int(digit), "copies": count(copies, "head's copies R")}
    clips = count(given["clips"], "clips K") if "clips" in given else 1
    if (most := clips * (head["copies"] if head else 1)) > MAX_COPIES:
        raise ValueError(f"at most {MAX_COPIES} clips per recording, got {most}")
    return {"head": head, "clips": clips}


def copies_of(rec: Recording, split: str, redundancy: dict[str, Any] | None) -> int:
    """How many clips `rec` gives in `split` under `redundancy` (from `parse_redundancy`)."""
    if redundancy is None or split != "train":
        return 1
    head = redundancy["head"]
    return redundancy["clips"] * (head["copies"] if head is not None and head["digit"] == rec.digit else 1)


def write_av_digits(
    out: str,
    *,
    fsdd_dir: str,
    digits_csv: str,
    test_speaker: str = "theo",
    frames: int = 8,
    size: int = 64,
    seconds: float = 1.0,
    seed: int = 0,
    sample_rate: int = 16000,
    max_takes: int | None = None,
    sync: str = "none",
    redundancy: str | Mapping[str, Any] | None = None,
    target_shard_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Write the AV-digits set to `out` (any URI): one clip per FSDD recording (or per
    recording with take < `max_takes`), `frames` frames of `size` x `size` pixels over
    `seconds`, mono audio at `sample_rate` Hz; `sync` picks the variant and `redundancy` (a
    `parse_redundancy` spec or dict) repeats train recordings (see the module docstring).
    `progress(done, total)` after each clip."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
    given = redundancy
    try:
        redundancy = parse_redundancy(given)
    except ValueError as err:
        raise ValueError(f"redundancy {given!r}: {err}") from None
    if frames < 1 or size < 16 or seconds <= 0 or sample_rate < 1000:
        raise ValueError(
            f"need frames >= 1, size >= 16, seconds > 0, sample_rate >= 1000; "
            f"got frames={frames}, size={size}, seconds={seconds}, sample_rate={sample_rate}"
        )
    recordings = find_recordings(fsdd_dir)
    speakers = sorted({r.speaker for r in recordings})
    if test_speaker not in speakers:
        raise DataError(f"test speaker {test_speaker!r} is not in {fsdd_dir} (speakers: {', '.join(speakers)})")
    if max_takes is not None:
        recordings = [r for r in recordings if r.take < max_takes]
    # Neighbouring rows vary in speaker and digit, so a bounded shuffle buffer mixes well.
    recordings.sort(key=lambda r: (r.take, r.speaker, r.digit))
    images, image_labels = read_digit_images(digits_csv)
    pools = _image_pools(image_labels, seed=seed)
    num_samples = round(seconds * sample_rate)
    split_of = {rec: "test" if rec.speaker == test_speaker else "train" for rec in recordings}
    # (place, recording, copy): copy 0 of every recording in the order above, the extra copies
    # at seeded random places among them.
    plan = [(float(i), rec, 0) for i, rec in enumerate(recordings)]
    place_rng = np.random.default_rng([seed, 9])
    for rec in recordings:
        plan += [
            (place_rng.uniform(0, len(recordings)), rec, c) for c in range(1, copies_of(rec, split_of[rec], redundancy))
        ]
    plan.sort(key=lambda item: item[0])
    uses_left = {rec: copies_of(rec, split_of[rec], redundancy) for rec in recordings}
    waves: dict[Recording, np.ndarray] = {}  # decoded recordings that still have copies to make

    params = {
        "test_speaker": test_speaker,
        "frames": frames,
        "size": size,
        "seconds": seconds,
        "seed": seed,
        "sample_rate": sample_rate,
        "max_takes": max_takes,
        "sync": sync,
        "redundancy": redundancy,
    }
    extra = {} if target_shard_bytes is None else {"target_shard_bytes": target_shard_bytes}
    writer = DatasetWriter(
        out,
        label_names=LABEL_NAMES,
        made_by={
            "generator": "av-digits",
            "source": f"{os.path.abspath(fsdd_dir)} + {digits_csv}",
            "params": params,
        },
        **extra,
    )
    for done, (_, rec, copy) in enumerate(plan, start=1):
        split = split_of[rec]
        key = [seed, rec.digit, speakers.index(rec.speaker), rec.take]
        rng = np.random.default_rng(key)
        image_index = int(rng.choice(pools[split, rec.digit]))
        wave = waves[rec] if rec in waves else decode_audio(rec.path, rate=sample_rate)[0]
        uses_left[rec] -= 1
        if uses_left[rec]:
            waves[rec] = wave
        else:
            waves.pop(rec, None)
        scene = None
        if copy:  # copy 0's image, background and ink; its own path, noise, level and placement
            if sync != "none":
                fit_audio(wave, rng, num_samples=num_samples)  # copy 0 draws its audio before its scene
            scene = _background(rng, size)
            rng = np.random.default_rng([*key, copy])
        if sync == "none":
            video = render_frames(images[image_index], rng, frames=frames, size=size, scene=scene)
            audio = fit_audio(wave, rng, num_samples=num_samples, jitter=copy > 0)
        else:  # the audio first: the picture follows what is stored
            audio = fit_audio(wave, rng, num_samples=num_samples, jitter=copy > 0)
            if sync == "spectral":
                envelope = band_envelopes(audio, frames, sample_rate=sample_rate)
            else:
                envelope = loudness_envelope(audio, frames)
            video = render_synced_frames(images[image_index], envelope, rng, size=size, mode=sync, scene=scene)
        name = os.path.basename(rec.path)
        writer.add(
            Clip(
                clip_id=f"avdigits-{rec.digit}_{rec.speaker}_{rec.take}" + (f"-c{copy}" if copy else ""),
                # With redundancy, a train recording's clips share its source; otherwise as ever.
                source=f"fsdd:{name}" if redundancy and split == "train" else f"fsdd:{name}+digits:{image_index}",
                start_s=0.0,
                fps=frames / seconds,
                frames=[encode_jpeg(f) for f in video],
                height=size,
                width=size,
                audio=encode_pcm(audio),
                sample_rate=sample_rate,
                label=rec.digit,
                split=split,
            )
        )
        if progress is not None:
            progress(done, len(plan))
    return writer.close()
