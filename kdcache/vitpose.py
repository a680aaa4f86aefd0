"""The ViTPose model: a plain ViT backbone plus a heatmap head, with the official parameter names.

The model and its presets; loading it from every released file is `kdcache.vitpose_family` (the teacher
family `kdcache.teacher` knows) with `kdcache.vitpose_formats` (the file layouts). Its targets are UDP heatmaps
(`kdcache.codec`).

Parameter names and shapes follow ViTAE-Transformer/ViTPose (`mmpose/models/backbones/vit.py`,
`mmpose/models/heads/topdown_heatmap_simple_head.py`), so the released checkpoints load without
renaming: `backbone.patch_embed.proj.*`, `backbone.pos_embed`, `backbone.blocks.{i}.{norm1,attn.qkv,
attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `backbone.last_norm.*`, and `keypoint_head.deconv_layers.{0,1,3,4}.*`
+ `keypoint_head.final_layer.*` (classic head) or `keypoint_head.final_layer.*` alone (simple head).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.checkpoint import ModelConfig
from kdcache.codec import DEFAULT_INPUT_HW, DEFAULT_SIGMA, UDPHeatmap
from kdcache.errors import UserError
from kdcache.keypoints import COCO_17

log = logging.getLogger(__name__)

KIND = "vitpose"  # the `kind` of kdcache checkpoints of this family
# The official PatchEmbed pads by 4 + 2 * (ratio // 2 - 1) = 2 for ratio 1 (every released model), so a
# 16x16/stride-16 conv over 256x192 gives a 16x12 grid; the padding changes the weights' meaning.
PATCH_PADDING = 2
HEAD_UPSAMPLING = 4  # both heads upsample the patch grid x4: 16x12 -> 64x48


@dataclass(frozen=True)
class ViTPoseConfig(ModelConfig):
    """Architecture of one ViTPose model (everything needed to rebuild it from its weights)."""

    title: ClassVar[str] = "ViTPose"

    arch: str  # preset name ("vitpose-b"), or "vitpose-custom" for inferred sizes with no preset
    embed_dim: int  # channels D of every token
    depth: int  # number of transformer blocks
    num_heads: int  # attention heads; D must divide evenly (not recoverable from weights)
    mlp_ratio: float = 4.0  # MLP hidden width / D
    patch_size: int = 16  # pixels per patch side (conv kernel and stride)
    input_hw: tuple[int, int] = DEFAULT_INPUT_HW  # crop (H, W) in pixels; decides the pos_embed grid
    head: str = "classic"  # one of HEADS: "classic" (2 deconvs + 1x1 conv), "simple" (ReLU, bilinear x4, 3x3 conv)
    num_keypoints: int = COCO_17.num_keypoints  # heatmap channels K
    deconv_channels: int = 256  # filters of each deconv layer (classic head only)
    layer_norm_eps: float = 1e-6  # eps of every LayerNorm (official: 1e-6)
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear from 0); training only

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise UserError(f"ViTPose head {self.head!r} is unknown; use one of {', '.join(HEADS)}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        h, w = self.input_hw
        if h % self.patch_size or w % self.patch_size:
            raise UserError(f"input size {h}x{w} must be a multiple of the patch size {self.patch_size}")

    @property
    def grid_hw(self) -> tuple[int, int]:
        """(Hp, Wp) patch grid: the PatchEmbed conv's output size for `input_hw`."""
        p = self.patch_size
        return tuple((s + 2 * PATCH_PADDING - p) // p + 1 for s in self.input_hw)

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        """(h, w) of the output heatmaps: input_hw / 4."""
        return tuple(g * HEAD_UPSAMPLING for g in self.grid_hw)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTPoseConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=p, stride=p, padding=PATCH_PADDING)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [N, 3, H, W] -> [N, D, Hp, Wp]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # official configs: qkv_bias=True
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, L, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as the official qk_scale=None
        return self.proj(x.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (no layer scale, no extra parameters)."""

    def __init__(self, cfg: ViTPoseConfig, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, round(dim * cfg.mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class ViTBackbone(nn.Module):
    def __init__(self, cfg: ViTPoseConfig):
        super().__init__()
        self.grid_hw = cfg.grid_hw
        self.patch_embed = PatchEmbed(cfg)
        # One slot more than the grid: the MAE pre-training's class token position, which the
        # official forward adds to every patch instead of dropping.
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid_hw) + 1, cfg.embed_dim))
        # Linear stochastic-depth schedule 0 .. drop_path_rate (plain Python: works on the meta device).
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.last_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, H, W] -> features [N, D, Hp, Wp]."""
        x = self.patch_embed(x)
        n, dim, hp, wp = x.shape
        if (hp, wp) != self.grid_hw:
            raise ValueError(f"input {tuple(x.shape)} gives a {hp}x{wp} patch grid; this model is built "
                             f"for {self.grid_hw[0]}x{self.grid_hw[1]}")
        x = x.flatten(2).transpose(1, 2)  # [N, Hp*Wp, D], row-major over the grid
        x = x + self.pos_embed[:, 1:] + self.pos_embed[:, :1]
        for block in self.blocks:
            x = block(x)
        x = self.last_norm(x)
        return x.transpose(1, 2).reshape(n, dim, hp, wp)


class ClassicHead(nn.Module):
    """SimpleBaseline head: (ConvTranspose 4x4/2 -> BN -> ReLU) x 2, then a 1x1 conv."""

    def __init__(self, cfg: ViTPoseConfig):
        super().__init__()
        c_in, c = cfg.embed_dim, cfg.deconv_channels
        self.deconv_layers = nn.Sequential(
            nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        )
        self.final_layer = nn.Conv2d(c, cfg.num_keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.deconv_layers(x))


class SimpleHead(nn.Module):
    """ViTPose simple decoder: ReLU, bilinear x4 (align_corners=False, the head's default), 3x3 conv."""

    def __init__(self, cfg: ViTPoseConfig):
        super().__init__()
        self.final_layer = nn.Conv2d(cfg.embed_dim, cfg.num_keypoints, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(F.relu(x), scale_factor=HEAD_UPSAMPLING, mode="bilinear", align_corners=False)
        return self.final_layer(x)


# The heads by ViTPoseConfig.head (train-teacher --head).
HEADS = {"classic": ClassicHead, "simple": SimpleHead}


# Official sizes from configs/body/2d_kpt_sview_rgb_img/topdown_heatmap/coco/ViTPose_*_coco_256x192.py
# (drop_path_rate as trained there). ViTPose-S has 12 heads of 32 channels, not the dim/64 rule.
ARCHS: dict[str, ViTPoseConfig] = {
    "vitpose-s": ViTPoseConfig("vitpose-s", 384, 12, 12, drop_path_rate=0.1),
    "vitpose-b": ViTPoseConfig("vitpose-b", 768, 12, 12, drop_path_rate=0.3),
    "vitpose-l": ViTPoseConfig("vitpose-l", 1024, 24, 16, drop_path_rate=0.5),
    "vitpose-h": ViTPoseConfig("vitpose-h", 1280, 32, 16, drop_path_rate=0.55),
    # Small CPU-trainable teachers for demos and tests (not official).
    "vitpose-tiny": ViTPoseConfig("vitpose-tiny", 192, 6, 3, deconv_channels=128),
    "vitpose-nano": ViTPoseConfig("vitpose-nano", 96, 4, 2, deconv_channels=64),
}


def vitpose_config(arch: str, head: str = "classic", input_hw: tuple[int, int] = DEFAULT_INPUT_HW) -> ViTPoseConfig:
    """Preset config by name (`ARCHS`), with the head type and input size chosen."""
    if arch not in ARCHS:
        raise UserError(f"unknown ViTPose architecture {arch!r}; known: {', '.join(ARCHS)}")
    return dataclasses.replace(ARCHS[arch], head=head, input_hw=tuple(input_hw))


class ViTPose(nn.Module):
    """ViTPose top-down model: images [N, 3, H, W] (ImageNet-normalised RGB) -> heatmaps [N, K, H/4, W/4]."""

    kind = KIND

    def __init__(self, config: ViTPoseConfig):
        super().__init__()
        self.config = config
        self.backbone = ViTBackbone(config)
        self.keypoint_head = HEADS[config.head](config)

    @property
    def codec(self) -> UDPHeatmap:
        """ViTPose's targets: UDP Gaussians of sigma 2 at its heatmap size."""
        return UDPHeatmap(tuple(self.config.input_hw), tuple(self.config.heatmap_hw), DEFAULT_SIGMA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.keypoint_head(self.backbone(x))


def build_vitpose(cfg: ViTPoseConfig) -> ViTPose:
    """A freshly initialised ViTPose, with the official initialisation (for training from scratch)."""
    model = ViTPose(cfg)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(model.backbone.pos_embed, std=0.02)
    for m in model.keypoint_head.modules():
        if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
