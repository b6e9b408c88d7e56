"""Device-side batch transforms: shapes, determinism under a generator, eval determinism."""

import pytest
import torch

from workers.data.transforms import KINETICS_MEAN, KINETICS_STD, AudioTransform, VideoTransform

pytestmark = pytest.mark.unit


def clips(batch: int = 4, frames: int = 6, height: int = 24, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, frames, height, width, 3), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def waves(batch: int = 3, samples: int = 4000) -> torch.Tensor:
    t = torch.arange(samples) / 16000
    tone = torch.sin(2 * torch.pi * 440 * t)
    return (tone[None] * torch.linspace(0.2, 0.8, batch)[:, None]).float()


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> the eval transform's expected [B, 3, T, H, W] output."""
    x = x.permute(0, 4, 1, 2, 3).float() / 255
    return (x - torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1)


def test_video_train_output_shape_dtype_and_range():
    out = VideoTransform(frames=4, size=16, train=True)(clips())
    assert out.shape == (4, 3, 4, 16, 16) and out.dtype == torch.float32
    low = (0 - torch.tensor(KINETICS_MEAN)) / torch.tensor(KINETICS_STD)
    high = (1 - torch.tensor(KINETICS_MEAN)) / torch.tensor(KINETICS_STD)
    per_channel = out.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(dim=1).values >= low - 1e-5).all()
    assert (per_channel.max(dim=1).values <= high + 1e-5).all()


def test_video_train_is_deterministic_given_a_generator():
    transform = VideoTransform(frames=4, size=16, train=True)
    x = clips()
    a = transform(x, generator=torch.Generator().manual_seed(1))
    b = transform(x, generator=torch.Generator().manual_seed(1))
    c = transform(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_video_train_augments_each_clip_differently():
    x = clips(batch=8).clone()
    x[:] = x[0]  # eight copies of one clip
    out = VideoTransform(frames=4, size=16, train=True)(x, generator=torch.Generator().manual_seed(0))
    assert len({out[i].sum().item() for i in range(8)}) == 8


def test_video_full_frame_crop_is_the_clip_or_its_mirror_image():
    x = clips(batch=16, frames=2, height=16, width=16)
    transform = VideoTransform(frames=2, size=16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0)
    out = transform(x, generator=torch.Generator().manual_seed(0))
    expected = normalise(x)
    flipped = [not torch.allclose(out[i], expected[i], atol=1e-5) for i in range(16)]
    for i in range(16):
        assert torch.allclose(out[i], expected[i].flip(-1) if flipped[i] else expected[i], atol=1e-5)
    assert 0 < sum(flipped) < 16


def test_video_eval_is_deterministic_and_an_identity_when_sizes_match():
    x = clips(frames=4, height=16, width=16)
    transform = VideoTransform(frames=4, size=16, train=False)
    assert torch.equal(transform(x), transform(x))
    assert torch.allclose(transform(x), normalise(x), atol=1e-5)


def test_video_eval_takes_the_centre_window_and_the_centre_square():
    x = clips(frames=6, height=16, width=24)
    out = VideoTransform(frames=2, size=16, train=False)(x)
    assert torch.allclose(out, normalise(x[:, 2:4, :, 4:20]), atol=1e-5)


def test_video_pads_short_clips_by_repeating_the_last_frame():
    x = clips(frames=2, height=16, width=16)
    out = VideoTransform(frames=4, size=16, train=False)(x)
    assert torch.allclose(out[:, :, 2], out[:, :, 1]) and torch.allclose(out[:, :, 3], out[:, :, 1])


def test_video_train_window_is_a_run_of_consecutive_stored_frames():
    # Each stored frame is one flat grey level (its number), so the chosen window shows in the output.
    frames = torch.arange(8, dtype=torch.uint8).mul(30).view(1, 8, 1, 1, 1).expand(16, 8, 8, 8, 3).contiguous()
    transform = VideoTransform(frames=3, size=8, train=True, jitter=0.0)
    out = transform(frames, generator=torch.Generator().manual_seed(0))
    level = (out[:, 0, :, 0, 0] * KINETICS_STD[0] + KINETICS_MEAN[0]) * 255 / 30  # B x 3 stored frame numbers
    level = level.round()
    assert torch.equal(level[:, 1] - level[:, 0], torch.ones(16)) and torch.equal(
        level[:, 2] - level[:, 1], torch.ones(16)
    )
    assert len(set(level[:, 0].tolist())) > 1  # windows differ between clips


@pytest.mark.parametrize("samples", [4000, 16000])
def test_audio_output_shape_follows_the_documented_frame_count(samples):
    transform = AudioTransform(sample_rate=16000, n_mels=40, hop_ms=10.0, train=True)
    out = transform(waves(samples=samples), generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 40, 1 + samples // 160) == (3, 1, 40, transform.num_frames(samples))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert AudioTransform(sample_rate=16000, n_mels=80, hop_ms=10.0, train=False).num_frames(16000) == 101


def test_audio_train_is_deterministic_given_a_generator_and_masks_something():
    transform = AudioTransform(sample_rate=16000, n_mels=40, hop_ms=10.0, train=True)
    x = waves()
    a = transform(x, generator=torch.Generator().manual_seed(3))
    b = transform(x, generator=torch.Generator().manual_seed(3))
    c = transform(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = AudioTransform(sample_rate=16000, n_mels=40, hop_ms=10.0, train=False)(x)
    assert not torch.allclose(a, plain)


def test_audio_eval_is_deterministic_and_matches_a_plain_log_mel():
    import torchaudio

    x = waves()
    transform = AudioTransform(sample_rate=16000, n_mels=40, hop_ms=10.0, train=False)
    out = transform(x)
    assert torch.equal(out, transform(x))
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=40, power=2.0
    )
    assert torch.allclose(out[:, 0], torch.log(mel(x) + 1e-6), atol=1e-5)


def test_spec_augment_masks_fill_whole_bands_with_the_clip_mean():
    transform = AudioTransform(
        sample_rate=16000, n_mels=40, hop_ms=10.0, train=True, gain_db=0.0, shift=0.0, num_masks=1, time_mask=0.3
    )
    x = waves(batch=6)
    out = transform(x, generator=torch.Generator().manual_seed(5))[:, 0]
    plain = AudioTransform(sample_rate=16000, n_mels=40, hop_ms=10.0, train=False)(x)[:, 0]
    changed = out != plain
    for i in range(6):
        rows = changed[i].all(dim=1)  # a frequency mask covers every frame of its bins
        columns = changed[i].all(dim=0)  # a time mask covers every bin of its frames
        assert torch.equal(changed[i], rows[:, None] | columns[None, :])
        assert torch.allclose(out[i][changed[i]], plain[i].mean().expand(int(changed[i].sum())))


def test_video_clip_norm_removes_each_clips_mean_colour_and_nothing_else():
    x = clips(frames=4, height=16, width=16)
    plain = VideoTransform(frames=4, size=16, train=False)(x)
    normed = VideoTransform(frames=4, size=16, train=False, clip_norm=True)(x)
    assert torch.allclose(normed, plain - plain.mean(dim=(2, 3, 4), keepdim=True), atol=1e-5)
    assert normed.mean(dim=(2, 3, 4)).abs().max() < 1e-5
    tinted = x.clone()
    tinted[..., 0] = tinted[..., 0] // 2  # the same clips with less red everywhere
    relative = VideoTransform(frames=4, size=16, train=False, clip_norm=True)(tinted)
    assert not torch.allclose(relative, normed, atol=1e-3)  # contrast is kept, only the offset goes


def test_audio_clip_norm_makes_the_level_of_a_clip_irrelevant():
    transform = AudioTransform(sample_rate=16000, n_mels=40, hop_ms=10.0, train=False, clip_norm=True)
    x = waves() + 0.1 * torch.randn(
        3, 4000, generator=torch.Generator().manual_seed(0)
    )  # every bin far above the floor
    out = transform(x)[:, 0]
    assert out.mean(dim=(1, 2)).abs().max() < 1e-4 and torch.allclose(out.std(dim=(1, 2)), torch.ones(3), atol=1e-4)
    assert torch.allclose(transform(x * 0.25)[:, 0], out, atol=1e-3)  # -12 dB: the same input to the encoder


def test_transforms_reject_wrong_shapes():
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        VideoTransform(frames=2, size=8, train=False)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        AudioTransform(sample_rate=16000, n_mels=40, hop_ms=10.0, train=False)(torch.zeros(4))
