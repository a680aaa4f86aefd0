"""Students: any timm backbone (features_only, deepest map) plus a heatmap head upsampling to stride 4.

The backbone is a plain timm name, never a registry of ours: `StudentConfig("mobilenetv3_large_100")`.
Its deepest feature map (stride 32, or 16 for plain ViTs) is brought to stride 4 by ×2 upsampling
blocks, then a 1×1 conv gives one heatmap per keypoint. Attention backbones (EfficientFormer v1 and V2,
ViT) are built for `input_hw` and only run at that size. ImageNet weights come from a file or, with
pretrained="timm", through timm's own cache (downloaded there when missing, as timm does); weights learnt at
224×224 have their relative-position attention tables fitted to `input_hw`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kdcache.checkpoint import ModelConfig, read_state_dict
from kdcache.codec import CODECS, DEFAULT_INPUT_HW, HEATMAP_STRIDE, Codec, UDPHeatmap
from kdcache.errors import UserError
from kdcache.keypoints import COCO_17

log = logging.getLogger(__name__)

KIND = "student"  # the `kind` of kdcache student checkpoints
# The students the issue names, each tested to build at 256x192, train and evaluate; any other timm name works too.
NAMED_STUDENTS = ("mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv4_conv_small",
                  "mobilenetv4_conv_medium", "efficientformer_l1", "efficientformer_l3", "efficientformerv2_s0",
                  "efficientformerv2_s1", "efficientformerv2_s2")


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """Everything needed to rebuild a student (stored as `model_config` in checkpoints)."""

    title: ClassVar[str] = "student"

    backbone: str  # timm model name, e.g. "mobilenetv3_large_100" (a ".tag" suffix picks pretrained weights)
    head: str = "deconv"  # HEADS: "deconv" (ConvT k4 s2 + BN + ReLU, SimpleBaseline), "light" (bilinear + dw-sep)
    input_hw: tuple[int, int] = DEFAULT_INPUT_HW  # crop size (H, W) in pixels; heatmaps are input_hw / 4
    num_keypoints: int = COCO_17.num_keypoints  # heatmap channels
    head_channels: int = 128  # width of every upsampling block of the head
    pretrained: str = ""  # "": random init; "timm": ImageNet weights via timm's cache (fetched if missing); or a file
    codec: str = UDPHeatmap.name  # CODECS: how its heatmaps are made and read, its teacher's (train-student sets it)
    keypoint_set: str = COCO_17.name  # KEYPOINT_SETS: what its channels are (train-student sets it from its data)

    @property
    def arch(self) -> str:
        """Its architecture's name, as teachers name theirs (a cache made with it as teacher records it)."""
        return self.backbone


class PoseStudent(nn.Module):
    """timm backbone + heatmap head.

    forward: x [N, 3, H, W] float32 (RGB, ImageNet-normalised) -> heatmaps [N, K, H/4, W/4].
    """

    kind = KIND

    def __init__(self, config: StudentConfig, backbone: nn.Module, in_channels: int, num_blocks: int):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.head = HEADS[config.head](in_channels, config.head_channels, num_blocks, config.num_keypoints)

    @property
    def codec(self) -> Codec:
        """How its heatmaps are read: its teacher's codec (`StudentConfig.codec`) at stride 4 of its input."""
        return CODECS[self.config.codec].for_input(self.config.input_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)[-1]  # deepest map: [N, C, H/stride, W/stride]
        return self.head(features)


def build_student(cfg: StudentConfig, load_pretrained: bool = True) -> PoseStudent:
    """Build the student described by `cfg`.

    Args:
        cfg: the student; `cfg.pretrained` says where backbone weights come from.
        load_pretrained: False skips `cfg.pretrained` (random init, config kept as is): for rebuilding a
            trained student from a checkpoint, whose state dict replaces every weight anyway, on a machine
            that may not have the ImageNet weights.
    """
    from kdcache import student_backbone as timm_backbone  # timm: only when a student is built

    if cfg.head not in HEADS:
        raise UserError(f"unknown student head {cfg.head!r}; choose one of {list(HEADS)}")
    if cfg.codec not in CODECS:
        raise UserError(f"unknown student codec {cfg.codec!r}; choose one of {list(CODECS)}")
    timm_backbone.check_known_model(cfg.backbone)
    pretrained = cfg.pretrained if load_pretrained else ""

    def create(weights: dict | None) -> nn.Module:
        return timm_backbone.create_backbone(cfg.backbone, cfg.input_hw, weights, cfg.pretrained)

    if pretrained == "timm":
        backbone = create(_read_weights(timm_backbone.timm_weights_file(cfg.backbone)))
        log.info("loaded ImageNet weights for %s from timm's cache", cfg.backbone)
    else:
        backbone = create(None)
    if pretrained not in ("", "timm"):
        sd = _read_weights(Path(pretrained))
        # A kdcache student (checkpoint "state_dict" or bare) keeps its backbone under "backbone.".
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")} or sd
        if set(backbone_sd) == set(backbone.state_dict()):
            backbone.load_state_dict(backbone_sd)
        else:
            backbone = create(sd)  # a timm (ImageNet classifier) state dict
        log.info("loaded backbone weights for %s from %s", cfg.backbone, cfg.pretrained)

    stride = backbone.feature_info.reduction()[-1]
    num_blocks = round(math.log2(stride / HEATMAP_STRIDE)) if stride > HEATMAP_STRIDE else 0
    if stride != HEATMAP_STRIDE * 2**num_blocks or num_blocks < 1:
        raise UserError(
            f"backbone {cfg.backbone} ends at stride {stride}; students need a power-of-two stride >= 8 "
            "(most timm CNNs: 32); pick another backbone"
        )
    if cfg.input_hw[0] % stride or cfg.input_hw[1] % stride:
        raise UserError(
            f"input_hw {tuple(cfg.input_hw)} is not divisible by the stride {stride} of {cfg.backbone}; "
            f"use a multiple of {stride} such as (256, 192)"
        )
    channels = _probe(backbone, cfg, stride)
    return PoseStudent(cfg, backbone, channels, num_blocks)


def student_from_checkpoint(obj: Mapping[str, Any], device: str | torch.device = "cpu") -> PoseStudent:
    """A kdcache student checkpoint already read (`{"format": "kdcache", "kind": "student", ...}`), in eval mode;
    no pretrained weights are read, its state dict holds every weight."""
    model = build_student(StudentConfig.from_dict(obj["model_config"]), load_pretrained=False)
    model.load_state_dict(obj["state_dict"])
    return model.to(device).eval()


def _probe(backbone: nn.Module, cfg: StudentConfig, stride: int) -> int:
    """One batch-1 forward at input_hw: fail at build time, not mid-training, on backbones whose layers are
    tied to another input size (e.g. fixed position embeddings), and check the map is input/stride.

    Returns the channels of the deepest map.
    """
    was_training = backbone.training
    backbone.eval()  # a train-mode probe would move the BatchNorm running statistics
    try:
        with torch.no_grad():
            features = backbone(torch.zeros(1, 3, *cfg.input_hw))[-1]
    except RuntimeError as e:
        raise UserError(
            f"backbone {cfg.backbone} fails on a {cfg.input_hw[0]}x{cfg.input_hw[1]} input "
            f"({str(e).splitlines()[0][:150]}); it may be tied to its ImageNet input size: pick another backbone"
        ) from None
    finally:
        backbone.train(was_training)
    expected = (cfg.input_hw[0] // stride, cfg.input_hw[1] // stride)
    if features.ndim != 4 or tuple(features.shape[-2:]) != expected:
        raise UserError(
            f"backbone {cfg.backbone} gives a {tuple(features.shape)} feature map for a {cfg.input_hw} input, "
            f"not [1, C, {expected[0]}, {expected[1]}]; pick another backbone"
        )
    return features.shape[1]


# --- heads ------------------------------------------------------------------------------------------


def _deconv_head(in_channels: int, width: int, num_blocks: int, num_keypoints: int) -> nn.Sequential:
    """SimpleBaseline / ViTPose-classic head: (ConvT k4 s2 p1 + BN + ReLU) × num_blocks, then 1×1 conv."""
    layers: list[nn.Module] = []
    for i in range(num_blocks):
        deconv = nn.ConvTranspose2d(in_channels if i == 0 else width, width, 4, stride=2, padding=1, bias=False)
        nn.init.normal_(deconv.weight, std=0.001)  # mmpose's init for this head
        layers += [deconv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    layers.append(_final_conv(width, num_keypoints))
    return nn.Sequential(*layers)


def _light_head(in_channels: int, width: int, num_blocks: int, num_keypoints: int) -> nn.Sequential:
    """1×1 reduction to `width` at low resolution (cheap), then (bilinear ×2 + depthwise 3×3 + pointwise 1×1)
    × num_blocks, then 1×1 conv."""
    layers: list[nn.Module] = [_conv_bn_relu(in_channels, width, 1)]
    for _ in range(num_blocks):
        layers += [
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_bn_relu(width, width, 3, groups=width),
            _conv_bn_relu(width, width, 1),
        ]
    layers.append(_final_conv(width, num_keypoints))
    return nn.Sequential(*layers)


def _conv_bn_relu(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _final_conv(width: int, num_keypoints: int) -> nn.Conv2d:
    conv = nn.Conv2d(width, num_keypoints, 1)
    nn.init.normal_(conv.weight, std=0.001)
    nn.init.zeros_(conv.bias)
    return conv


# The heads by StudentConfig.head (train-student --head).
HEADS = {"deconv": _deconv_head, "light": _light_head}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (never unpickles code: weights_only)."""
    if not path.is_file():
        raise UserError(f"backbone weights file {path} not found; pass an existing file or pretrained=''")
    return read_state_dict(path)
