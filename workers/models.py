"""Encoders of CM-ACC (docs/architecture.md, "The method"): video and audio ResNet-18 backbones, MLP heads.

Per modality the encoder is a backbone (pooled to one feature vector per clip) followed by a
2-layer MLP head to d, whose output is L2-normalised. `features(x)` is the pooled backbone
output (what the probes read), `forward(x)` the normalised head output (what the loss reads).

* Video: R3D-18 (3x3x3 convolutions) or R(2+1)D-18 (1x3x3 spatial then 3x1x1 temporal), built
  from torchvision's video ResNet blocks with every channel count scaled by a width multiplier
  (torchvision's own `VideoResNet` fixes 64..512 channels). Input [B, 3, T, H, W].
* Audio: ResNet-18 with a 1-channel stem over a log-mel spectrogram [B, 1, n_mels, frames],
  built from torchvision's 2D `BasicBlock`, with the same width multiplier.

Random initialisation only: nothing is downloaded. No distribution logic lives here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import resnet as resnet2d
from torchvision.models.video import resnet as resnet3d

from service.config import AudioModelConfig, ModelConfig, VideoModelConfig

RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET_WIDTHS = (64, 128, 256, 512)


def scaled_channels(channels: int, width: float) -> int:
    """`channels` x `width`, rounded to a multiple of 8 (tensor-core friendly), at least 8."""
    return max(8, round(channels * width / 8) * 8)


def _init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He-normal convolutions, unit BatchNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet18_stages(
    widths: list[int],
    *,
    block: Callable[[int, int, int, nn.Module | None], nn.Module],
    downsample: Callable[[int, int, int], nn.Module],
) -> list[nn.Module]:
    """The four stages of a ResNet-18 at `widths` channels: two blocks each, the first of every
    stage after the first halving the resolution (stride 2), with a projection shortcut
    (`downsample(in, out, stride)`) wherever the shape changes. `block(in, out, stride,
    shortcut)` makes one residual block (2D or 3D)."""
    stages = []
    in_planes = widths[0]
    for index, (planes, num_blocks) in enumerate(zip(widths, RESNET18_BLOCKS, strict=True)):
        stride = 1 if index == 0 else 2
        shortcut = downsample(in_planes, planes, stride) if stride != 1 or in_planes != planes else None
        blocks = [block(in_planes, planes, stride, shortcut)]
        blocks += [block(planes, planes, 1, None) for _ in range(num_blocks - 1)]
        stages.append(nn.Sequential(*blocks))
        in_planes = planes
    return stages


class ProjectionHead(nn.Sequential):
    """2-layer MLP from backbone features to the embedding size d.

    `norm="none"`: Linear, ReLU, Linear. `norm="batch"`: Linear, BatchNorm, ReLU, Linear,
    BatchNorm without affine parameters (as MoCo v3's heads): the batch statistics keep the
    embeddings spread across the batch, so they cannot all collapse to one direction.
    """

    def __init__(self, *, in_features: int, hidden: int, out_features: int, norm: str = "none"):
        if norm == "none":
            super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))
        elif norm == "batch":
            super().__init__(
                nn.Linear(in_features, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, out_features, bias=False),
                nn.BatchNorm1d(out_features, affine=False),
            )
        else:
            raise ValueError(f"model.head_norm: unknown head normalisation {norm!r}")


class VideoBackbone(nn.Module):
    """R3D-18 or R(2+1)D-18 with scaled widths; [B, 3, T, H, W] -> pooled features [B, C]."""

    def __init__(self, *, arch: str, width: float):
        super().__init__()
        widths = [scaled_channels(c, width) for c in RESNET_WIDTHS]
        if arch == "r3d_18":
            conv_builder = resnet3d.Conv3DSimple
            self.stem = nn.Sequential(
                nn.Conv3d(3, widths[0], kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                nn.BatchNorm3d(widths[0]),
                nn.ReLU(inplace=True),
            )
        elif arch == "r2plus1d_18":
            conv_builder = resnet3d.Conv2Plus1D
            # torchvision's 45 mid-channels give the factorised stem the parameters of a 3x7x7 one.
            mid = max(8, round(45 * width))
            self.stem = nn.Sequential(
                nn.Conv3d(3, mid, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
                nn.BatchNorm3d(mid),
                nn.ReLU(inplace=True),
                nn.Conv3d(mid, widths[0], kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
                nn.BatchNorm3d(widths[0]),
                nn.ReLU(inplace=True),
            )
        else:
            raise ValueError(f"model.video.arch: unknown video architecture {arch!r}")

        def downsample(in_planes: int, planes: int, stride: int) -> nn.Module:
            stride_3d = conv_builder.get_downsample_stride(stride)
            return nn.Sequential(
                nn.Conv3d(in_planes, planes, kernel_size=1, stride=stride_3d, bias=False), nn.BatchNorm3d(planes)
            )

        def block(in_planes: int, planes: int, stride: int, down: nn.Module | None) -> nn.Module:
            return resnet3d.BasicBlock(in_planes, planes, conv_builder, stride, down)

        layers = resnet18_stages(widths, block=block, downsample=downsample)
        self.layers = nn.Sequential(*layers)
        self.out_features = widths[-1]
        _init_weights(self)

    def forward(self, video: Tensor) -> Tensor:
        x = self.layers(self.stem(video))  # B x C x T' x H' x W'
        return x.mean(dim=(2, 3, 4))  # B x C


class AudioBackbone(nn.Module):
    """ResNet-18 over a log-mel spectrogram; [B, 1, n_mels, frames] -> pooled features [B, C]."""

    def __init__(self, *, width: float):
        super().__init__()
        widths = [scaled_channels(c, width) for c in RESNET_WIDTHS]
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )

        def downsample(in_planes: int, planes: int, stride: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

        layers = resnet18_stages(widths, block=resnet2d.BasicBlock, downsample=downsample)
        self.layers = nn.Sequential(*layers)
        self.out_features = widths[-1]
        _init_weights(self)

    def forward(self, log_mel: Tensor) -> Tensor:
        x = self.layers(self.stem(log_mel))  # B x C x F' x T'
        return x.mean(dim=(2, 3))  # B x C


class Encoder(nn.Module):
    """A backbone and its projection head: one modality's f_m (or its key encoder h_m)."""

    def __init__(
        self, *, backbone: VideoBackbone | AudioBackbone, embed_dim: int, head_hidden: int, head_norm: str = "none"
    ):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(
            in_features=backbone.out_features, hidden=head_hidden, out_features=embed_dim, norm=head_norm
        )

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone output, B x C (C = 512 x width, rounded)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """L2-normalised embeddings, B x d."""
        return F.normalize(self.head(self.backbone(x)), dim=1)


def build_video_encoder(cfg: VideoModelConfig, *, embed_dim: int, head_hidden: int, head_norm: str = "none") -> Encoder:
    backbone = VideoBackbone(arch=cfg.arch, width=cfg.width)
    return Encoder(backbone=backbone, embed_dim=embed_dim, head_hidden=head_hidden, head_norm=head_norm)


def build_audio_encoder(cfg: AudioModelConfig, *, embed_dim: int, head_hidden: int, head_norm: str = "none") -> Encoder:
    if cfg.arch != "resnet18":
        raise ValueError(f"model.audio.arch: unknown audio architecture {cfg.arch!r}")
    backbone = AudioBackbone(width=cfg.width)
    return Encoder(backbone=backbone, embed_dim=embed_dim, head_hidden=head_hidden, head_norm=head_norm)


class AudioVisualEncoder(nn.Module):
    """Both modalities' encoders in one module, so one DDP wrapper and one optimiser cover them.

    `forward(video, audio)` returns the L2-normalised embeddings (z_v [B, d], z_a [B, d]).
    """

    def __init__(self, *, video: Encoder, audio: Encoder):
        super().__init__()
        self.video = video
        self.audio = audio

    def forward(self, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        return self.video(video), self.audio(audio)


def build_encoders(cfg: ModelConfig) -> AudioVisualEncoder:
    """Randomly initialised query encoders f_v, f_a with their heads, as `cfg` describes."""
    head = {"embed_dim": cfg.embed_dim, "head_hidden": cfg.head_hidden, "head_norm": cfg.head_norm}
    return AudioVisualEncoder(
        video=build_video_encoder(cfg.video, **head),
        audio=build_audio_encoder(cfg.audio, **head),
    )


def make_key_encoder(query: nn.Module) -> nn.Module:
    """A copy of `query` for the EMA key encoder: same weights and buffers, no gradients."""
    key = copy.deepcopy(query)
    for p in key.parameters():
        p.requires_grad_(False)
    return key


@torch.no_grad()
def momentum_update(
    key_module: nn.Module, query_module: nn.Module, momentum: float, *, apply: torch.Tensor | None = None
) -> None:
    """EMA of the key encoder: key = momentum x key + (1 - momentum) x query, per parameter,
    in one foreach kernel. `apply`, a 0-dim bool tensor, makes the update conditional on the
    device (False: nothing changes) without a host sync.

    Buffers (BatchNorm running statistics, counters) are copied from the query encoder.
    Parameters and buffers are matched by registration order, so `query_module` may be the
    query encoder inside a wrapper (DDP) whose names carry a prefix.
    """
    key_params = list(key_module.parameters())
    query_params = list(query_module.parameters())
    if len(key_params) != len(query_params):
        raise ValueError(f"key encoder has {len(key_params)} parameters, query encoder {len(query_params)}")
    weight: float | torch.Tensor = 1.0 - momentum
    if apply is not None:
        weight = apply.to(key_params[0].dtype) * (1.0 - momentum)
    torch._foreach_lerp_(key_params, [q.detach() for q in query_params], weight)
    for key_buffer, query_buffer in zip(key_module.buffers(), query_module.buffers(), strict=True):
        key_buffer.copy_(query_buffer if apply is None else torch.where(apply, query_buffer, key_buffer))
