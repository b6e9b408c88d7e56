"""Batch augmentations that run on the training device (docs/architecture.md, "Data").

Both transforms take a whole batch from the reader, already on the device, and draw every
random number from an optional `torch.Generator`: the same generator state gives the same
output. The evaluation variants (`train=False`) draw nothing and are fully deterministic.

* `VideoTransform`: uint8 [B, T, H, W, 3] -> float32 [B, 3, frames, size, size], normalised
  with the Kinetics-400 mean and std that torchvision's video models use.
* `AudioTransform`: float32 waveform [B, S] -> log-mel [B, 1, n_mels, num_frames(S)].
* `Transforms` (built by `build_transforms` from a run's config) applies both to a reader
  batch; `step_generator` seeds a training step's augmentation from (seed, rank, step), so
  no random state needs a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from service.config import Config
from workers.data.decode import decode_batch

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's grayscale uses


def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform draws in [low, high) on `device`, taken from `generator` when one is given
    (on the generator's own device, so a CPU generator drives a GPU batch reproducibly)."""
    if generator is None:
        u = torch.rand(shape, device=device)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return low + (high - low) * u


class VideoTransform(nn.Module):
    """Clip augmentation: temporal window, multi-scale crop, flip, colour jitter, normalisation.

    Train: per clip, a random window of `frames` consecutive frames (when more are stored), a
    random crop covering `scale` of the frame area with aspect ratio in `ratio`, resized to
    `size` x `size` (bilinear), a horizontal flip with probability 1/2, and with probability
    `jitter_p` brightness, contrast and saturation factors drawn from [1 - jitter, 1 + jitter].
    The same crop, flip and colours apply to every frame of a clip.
    Eval: the centred window, the largest centred square, resized; nothing random.
    Clips with fewer than `frames` frames repeat their last one.
    Output: normalised with the Kinetics mean and std; with `clip_norm`, each clip's own mean
    per channel (over frames and pixels) is subtracted too, so the clip's overall colour (a
    factor the sound cannot know) does not dominate the embedding of a random encoder.
    """

    def __init__(
        self,
        *,
        frames: int,
        size: int,
        train: bool,
        scale: tuple[float, float] = (0.4, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: float = 0.4,
        jitter_p: float = 0.8,
        clip_norm: bool = False,
    ):
        super().__init__()
        if frames < 1:
            raise ValueError(f"VideoTransform frames: must be >= 1, got {frames}")
        if size < 1:
            raise ValueError(f"VideoTransform size: must be >= 1, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"VideoTransform scale: must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"VideoTransform ratio: must satisfy 0 < low <= high, got {ratio}")
        if not 0 <= jitter < 1:
            raise ValueError(f"VideoTransform jitter: must be in [0, 1), got {jitter}")
        self.frames = frames
        self.size = size
        self.train = train
        self.scale = scale
        self.ratio = ratio
        self.jitter = jitter
        self.jitter_p = jitter_p
        self.clip_norm = clip_norm
        self.register_buffer("mean", torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] -> float32 [B, 3, frames, size, size]."""
        if x.dim() != 5 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"VideoTransform expects uint8 [B, T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
        batch, _, height, width, _ = x.shape
        device = x.device
        x = self._window(x, generator)  # B x frames x H x W x 3, uint8
        # Channels of all frames side by side, so one grid_sample crops, flips and resizes a clip.
        clips = x.permute(0, 1, 4, 2, 3).reshape(batch, self.frames * 3, height, width).float().div_(255)
        theta = self._crop_boxes(batch, height, width, generator, device)
        grid = F.affine_grid(theta, [batch, 1, self.size, self.size], align_corners=False)
        clips = F.grid_sample(clips, grid, mode="bilinear", padding_mode="border", align_corners=False)
        clips = clips.view(batch, self.frames, 3, self.size, self.size)  # B x T x C x s x s
        if self.train and self.jitter > 0:
            clips = self._colour_jitter(clips, generator)
        clips = clips.permute(0, 2, 1, 3, 4)  # B x C x T x s x s
        clips = (clips - self.mean) / self.std
        if self.clip_norm:
            clips = clips - clips.mean(dim=(2, 3, 4), keepdim=True)
        return clips

    def _window(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, stored = x.shape[:2]
        if stored == self.frames:
            return x
        spare = max(stored - self.frames, 0)
        if self.train:
            start = (_uniform((batch,), 0, 1, generator, x.device) * (spare + 1)).long().clamp_(max=spare)
        else:
            start = torch.full((batch,), spare // 2, device=x.device)
        numbers = (start[:, None] + torch.arange(self.frames, device=x.device)).clamp_(max=stored - 1)
        return x[torch.arange(batch, device=x.device)[:, None], numbers]

    def _crop_boxes(
        self, batch: int, height: int, width: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Affine maps [B, 2, 3] from output to input coordinates (in [-1, 1]) that pick each
        clip's crop box, mirrored when the clip is flipped."""
        if not self.train:
            side = min(height, width)
            half_w = torch.full((batch,), side / width, device=device)
            half_h = torch.full((batch,), side / height, device=device)
            centre_x = torch.zeros(batch, device=device)
            centre_y = torch.zeros(batch, device=device)
            flip = torch.ones(batch, device=device)
        else:
            area = _uniform((batch,), *self.scale, generator, device) * height * width
            log_ratio = _uniform((batch,), math.log(self.ratio[0]), math.log(self.ratio[1]), generator, device)
            aspect = torch.exp(log_ratio)  # width / height of the crop
            crop_w = torch.sqrt(area * aspect).clamp(1, width)
            crop_h = torch.sqrt(area / aspect).clamp(1, height)
            # Half-extents and centres in normalised coordinates: the full frame spans [-1, 1].
            half_w, half_h = crop_w / width, crop_h / height
            centre_x = (1 - half_w) * (2 * _uniform((batch,), 0, 1, generator, device) - 1)
            centre_y = (1 - half_h) * (2 * _uniform((batch,), 0, 1, generator, device) - 1)
            flip = torch.where(_uniform((batch,), 0, 1, generator, device) < 0.5, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0] = half_w * flip
        theta[:, 0, 2] = centre_x
        theta[:, 1, 1] = half_h
        theta[:, 1, 2] = centre_y
        return theta

    def _colour_jitter(self, clips: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Brightness, contrast, saturation on [B, T, 3, s, s] in [0, 1], one set per clip."""
        batch, device = clips.shape[0], clips.device
        low, high = 1 - self.jitter, 1 + self.jitter
        factors = _uniform((3, batch), low, high, generator, device)
        apply = _uniform((batch,), 0, 1, generator, device) < self.jitter_p
        factors = torch.where(apply[None], factors, torch.ones_like(factors)).view(3, batch, 1, 1, 1, 1)
        brightness, contrast, saturation = factors
        clips = (clips * brightness).clamp_(0, 1)
        gray = (clips * self.luma).sum(dim=2, keepdim=True)  # B x T x 1 x s x s
        mean = gray.mean(dim=(1, 3, 4), keepdim=True)  # one grey level per clip, as contrast pivots
        clips = ((clips - mean) * contrast + mean).clamp_(0, 1)
        gray = (clips * self.luma).sum(dim=2, keepdim=True)
        return ((clips - gray) * saturation + gray).clamp_(0, 1)


class AudioTransform(nn.Module):
    """Waveform to log-mel, with train-time gain, time shift and SpecAugment masks.

    The spectrogram: `torchaudio.transforms.MelSpectrogram` with hop = round(sample_rate *
    hop_ms / 1000) samples, a Hann window of round(sample_rate * win_ms / 1000) samples,
    n_fft = the next power of two >= the window, centred frames, power 2; then log(mel + 1e-6).
    For S input samples the output has `num_frames(S) = 1 + S // hop` frames (16 kHz, 1 s,
    10 ms: 101 frames).

    Train, per clip: gain drawn in dB from [-gain_db, gain_db]; a shift by up to `shift` of
    the clip's length either way (the vacated samples are silent); then `num_masks` frequency
    masks of up to `freq_mask` mel bins and `num_masks` time masks of up to `time_mask` of the
    frames, each set to the clip's mean log-mel. Eval: the plain log-mel, nothing random.
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        n_mels: int,
        hop_ms: float,
        train: bool,
        win_ms: float = 25.0,
        gain_db: float = 6.0,
        shift: float = 0.1,
        freq_mask: int = 0,
        time_mask: float = 0.1,
        num_masks: int = 2,
        clip_norm: bool = False,
    ):
        super().__init__()
        if sample_rate < 1:
            raise ValueError(f"AudioTransform sample_rate: must be >= 1 Hz, got {sample_rate}")
        if n_mels < 1:
            raise ValueError(f"AudioTransform n_mels: must be >= 1, got {n_mels}")
        self.hop_length = round(sample_rate * hop_ms / 1000)
        if self.hop_length < 1:
            raise ValueError(f"AudioTransform hop_ms: {hop_ms} ms is less than one sample at {sample_rate} Hz")
        win_length = max(round(sample_rate * win_ms / 1000), self.hop_length)
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.train = train
        self.gain_db = gain_db
        self.shift = shift
        self.freq_mask = freq_mask or max(n_mels // 8, 1)  # 0 = an eighth of the bins
        self.time_mask = time_mask
        self.num_masks = num_masks
        self.clip_norm = clip_norm
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=1 << (win_length - 1).bit_length(),
            win_length=win_length,
            hop_length=self.hop_length,
            n_mels=n_mels,
            power=2.0,
            center=True,
        )

    def num_frames(self, num_samples: int) -> int:
        """Log-mel frames produced from `num_samples` waveform samples."""
        return 1 + num_samples // self.hop_length

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """float32 [B, S] -> float32 [B, 1, n_mels, num_frames(S)]."""
        if x.dim() != 2:
            raise ValueError(f"AudioTransform expects a float waveform [B, S], got {tuple(x.shape)}")
        x = x.float()
        if self.train:
            x = self._gain_and_shift(x, generator)
        spec = torch.log(self.mel(x) + 1e-6)  # B x n_mels x frames
        if self.train and self.num_masks > 0:
            spec = self._spec_augment(spec, generator)
        if self.clip_norm:  # level and noise floor are factors the picture cannot know
            spec = (spec - spec.mean(dim=(1, 2), keepdim=True)) / spec.std(dim=(1, 2), keepdim=True).clamp_min(1e-5)
        return spec.unsqueeze(1)

    def _gain_and_shift(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, samples = x.shape
        gain = 10 ** (_uniform((batch, 1), -self.gain_db, self.gain_db, generator, x.device) / 20)
        limit = int(self.shift * samples)
        offset = (_uniform((batch, 1), -limit, limit + 1, generator, x.device)).floor().long()
        source = torch.arange(samples, device=x.device)[None] - offset  # B x S
        inside = (source >= 0) & (source < samples)
        shifted = x.gather(1, source.clamp(0, samples - 1)) * inside
        return shifted * gain

    def _spec_augment(self, spec: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch, bins, frames = spec.shape
        fill = spec.mean(dim=(1, 2), keepdim=True)
        masked = torch.zeros_like(spec, dtype=torch.bool)
        for axis, extent, widest in ((1, bins, self.freq_mask), (2, frames, max(int(self.time_mask * frames), 1))):
            positions = torch.arange(extent, device=spec.device)
            for _ in range(self.num_masks):
                width = (_uniform((batch,), 0, widest + 1, generator, spec.device)).floor().long()
                start = (_uniform((batch,), 0, 1, generator, spec.device) * (extent - width + 1)).floor().long()
                band = (positions[None] >= start[:, None]) & (positions[None] < (start + width)[:, None])  # B x extent
                masked |= band[:, :, None] if axis == 1 else band[:, None, :]
        return torch.where(masked, fill, spec)


@dataclass(kw_only=True)
class Transforms:
    """Both modalities' transforms of a run: raw reader batch -> model inputs."""

    video: VideoTransform
    audio: AudioTransform

    def __call__(
        self, raw: dict[str, Any], *, device: torch.device, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Raw reader batch (`frames`, or `jpeg` for the decode on the device; `audio`, `index`,
        `label`, optionally `source`) -> model inputs on `device`."""
        inputs = {
            "video": self.video(raw_frames(raw, device=device), generator=generator),
            "audio": self.audio(raw["audio"].to(device, non_blocking=True), generator=generator),
            "index": raw["index"].to(device),
            "label": raw["label"].to(device),
        }
        if "source" in raw:
            inputs["source"] = raw["source"].to(device)
        return inputs


def raw_frames(raw: dict[str, Any], *, device: torch.device) -> torch.Tensor:
    """The batch's uint8 [B, T, H, W, 3] frames on `device`: copied there, or with the decode
    on the device decoded there from the encoded frames, all in one call (`decode_batch`)."""
    if raw.get("frames") is not None:
        return raw["frames"].to(device, non_blocking=True)
    if "jpeg" not in raw:
        raise ValueError("a reader batch without frames: neither decoded `frames` nor encoded `jpeg`")
    return decode_batch(raw["jpeg"], device=device, clip_ids=raw["clip_id"])


def build_transforms(cfg: Config, *, device: torch.device, train: bool = True) -> Transforms:
    """The model inputs of `cfg.model`: augmented for training, deterministic for evaluation."""
    video, audio = cfg.model.video, cfg.model.audio
    return Transforms(
        video=VideoTransform(
            frames=video.frames,
            size=video.size,
            train=train,
            scale=(video.crop_scale, 1.0),
            jitter=video.jitter,
            clip_norm=video.clip_norm,
        ).to(device),
        audio=AudioTransform(
            sample_rate=cfg.data.sample_rate,
            n_mels=audio.n_mels,
            hop_ms=audio.hop_ms,
            train=train,
            clip_norm=audio.clip_norm,
        ).to(device),
    )


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The augmentation generator of one rank's step: no state to checkpoint."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) % (2**63))
