"""HRNet up to its third stage: the feature extractor in front of TokenPose-B (HRNet-W32) and TokenPose-L (W48).

Structure and parameter names follow TokenPose's `lib/models/hr_base.py` (`HRNET_base`), so its checkpoints
load without renaming (under the `pre_feature.` prefix there):

    conv1, bn1, conv2, bn2          two 3x3 stride-2 convolutions: stride 4, 64 channels
    layer1.{0..3}                   4 Bottlenecks, 64 -> 256 channels (layer1.0.downsample.{0,1})
    transition1.{0, 1.0}            256 -> C (3x3) and 256 -> 2C (3x3, stride 2)
    stage2.0                        one module of 2 branches of 4 BasicBlocks, fused
    transition2.2.0                 2C -> 4C (3x3, stride 2): the third branch
    stage3.{0..3}                   four modules of 3 branches; the last fuses into branch 0 only

Output: branch 0 of the last module, [N, C, H/4, W/4], C = `width` (32 or 48). Every convolution is
bias-free and followed by BatchNorm; fusion upsamples with nearest neighbour, as the original does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGE_BLOCKS = 4  # blocks per branch in every stage (TokenPose's configs: NUM_BLOCKS 4)
STAGE3_MODULES = 4  # HighResolutionModules of stage 3 (stage 2 has one)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) with a residual; `downsample` when the channels change."""

    def __init__(self, c_in: int, planes: int, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual (same channels)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def resnet_stem() -> tuple[nn.Module, ...]:
    """conv1, bn1, conv2, bn2, layer1: the stride-4, 256-channel stem HRNet and TokenPose-S share."""
    downsample = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256))
    layer1 = nn.Sequential(Bottleneck(64, 64, downsample), *(Bottleneck(256, 64) for _ in range(3)))
    return (nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64),
            nn.Conv2d(64, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), layer1)


def run_resnet_stem(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: [N, 3, H, W] -> [N, 256, H/4, W/4] through `module`'s conv1, bn1, conv2, bn2, layer1."""
    x = F.relu(module.bn1(module.conv1(x)))
    x = F.relu(module.bn2(module.conv2(x)))
    return module.layer1(x)


def _fuse(c_from: int, c_to: int, steps: int) -> nn.Module | None:
    """Branch j -> branch i, `steps` = i - j: 1x1 conv + BN then nearest upsampling x2^(j-i) when j is coarser
    (steps < 0); `steps` stride-2 3x3 convs when j is finer (steps > 0), ReLU between them but not after the
    last; None for j == i."""
    if steps == 0:
        return None
    if steps < 0:
        return nn.Sequential(nn.Conv2d(c_from, c_to, 1, bias=False), nn.BatchNorm2d(c_to),
                             nn.Upsample(scale_factor=2 ** -steps, mode="nearest"))
    chain = [_conv_bn(c_from, c_from, 3, 2) for _ in range(steps - 1)]
    return nn.Sequential(*chain, _conv_bn(c_from, c_to, 3, 2, relu=False))


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every output branch sums all inputs brought to its resolution."""

    def __init__(self, channels: tuple[int, ...], multi_scale_output: bool = True):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(*(BasicBlock(c) for _ in range(STAGE_BLOCKS))) for c in channels)
        outputs = range(len(channels) if multi_scale_output else 1)
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(_fuse(channels[j], channels[i], i - j)
                          for j in range(len(channels))) for i in outputs)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, fuse in enumerate(self.fuse_layers):
            y = xs[0] if i == 0 else fuse[0](xs[0])
            for j in range(1, len(xs)):
                y = y + (xs[j] if i == j else fuse[j](xs[j]))
            out.append(F.relu(y))
        return out


class HRNetStage3(nn.Module):
    """HRNet-W`width` through stage 3: x [N, 3, H, W] -> [N, width, H/4, W/4]."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2, self.layer1 = resnet_stem()
        c = (width, 2 * width, 4 * width)
        self.transition1 = nn.ModuleList([_conv_bn(256, c[0], 3), nn.Sequential(_conv_bn(256, c[1], 3, 2))])
        self.stage2 = nn.Sequential(HighResolutionModule(c[:2]))
        self.transition2 = nn.ModuleList([None, None, nn.Sequential(_conv_bn(c[1], c[2], 3, 2))])
        self.stage3 = nn.Sequential(*(HighResolutionModule(c, multi_scale_output=m < STAGE3_MODULES - 1)
                                      for m in range(STAGE3_MODULES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_resnet_stem(self, x)
        ys = self.stage2([t(x) for t in self.transition1])
        ys = self.stage3([ys[0], ys[1], self.transition2[2](ys[-1])])
        return ys[0]
