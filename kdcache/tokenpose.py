"""The TokenPose model (Li et al., ICCV 2021): keypoint tokens that attend to image patch tokens, and an MLP that
turns each keypoint token into its heatmap. Loading it from files is `kdcache.tokenpose_family`.

Variants and parameter names follow github leeyegy/TokenPose (`lib/models/pose_tokenpose_{t,s,b,l}.py`,
`tokenpose_base.py`, `hr_base.py`), so the official code's checkpoints load without renaming:

    T      transformer.*                          patches of the image itself (3 channels)
    S      features.{conv1,bn1,conv2,bn2,layer1}.* + features.*
                                                  patches of a stride-4 ResNet stem (256 channels); v1 4x3, v2 2x2
    B      pre_feature.* (HRNet-W32 to stage 3) + transformer.*
    L/D24  pre_feature.* (HRNet-W48 to stage 3) + transformer.{transformer1,2,3}.*: three 8-block transformers
           in a row, the three outputs' keypoint tokens concatenated before the head

The base module (`transformer` or `features`) holds `keypoint_token` [1, K, D], `pos_embedding` (the fixed
2-D sine encoding, [1, patches, D], stored in the checkpoints), `patch_to_embedding`, the blocks
`transformer.layers.{i}.{0: attention, 1: MLP}.fn.{norm, fn}` and `mlp_head`. Conventions that change the
function and are easy to miss: LayerNorm eps 1e-5 (torch's default); the attention scale is
(D / heads)^-1/2 in T, B and L but D^-1/2 in S (its transformer is built without `scale_with_head`); the
query/key/value projection has no bias; with "sine-full" (every COCO config) the sine encoding is added again
to the patch tokens before every block but the first; patches flatten as (row, column, channel).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kdcache.checkpoint import ModelConfig
from kdcache.codec import CODECS, DEFAULT_INPUT_HW, DEFAULT_SIGMA, Codec, TokenPoseHeatmap, heatmap_hw_for
from kdcache.errors import UserError
from kdcache.hrnet_stem import HRNetStage3, resnet_stem, run_resnet_stem
from kdcache.keypoints import COCO_17

KIND = "tokenpose"  # the `kind` of kdcache checkpoints of this family
POS_EMBEDDINGS = ("sine-full", "sine", "learnable")
HRNET_WIDTH = {"b": 32, "l": 48}  # the HRNet in front of B and L
STEM_CHANNELS = {"t": 3, "s": 256, "b": 32, "l": 48}  # channels of the map cut into patches


@dataclass(frozen=True)
class TokenPoseConfig(ModelConfig):
    """Architecture of one TokenPose model (everything needed to rebuild it from its weights)."""

    title: ClassVar[str] = "TokenPose"

    arch: str  # preset name ("tokenpose-b"), or "tokenpose-custom"
    variant: str  # "t" (image patches), "s" (ResNet stem), "b" (HRNet-W32), "l" (HRNet-W48, 3 transformers)
    dim: int  # channels D of every token
    depth: int  # blocks per transformer (L has three of them)
    heads: int  # attention heads (not recoverable from weights)
    patch_hw: tuple[int, int]  # patch (h, w) in pixels of the map it cuts (the image for T, stride 4 otherwise)
    mlp_ratio: int = 3  # MLP hidden width / D
    input_hw: tuple[int, int] = DEFAULT_INPUT_HW  # crop (H, W); fixes the patch grid and the heatmap size
    num_keypoints: int = COCO_17.num_keypoints  # keypoint tokens K
    hidden_heatmap_dim: int | None = 384  # width of the head's hidden layer, None: one Linear (L)
    pos_embedding: str = "sine-full"  # one of POS_EMBEDDINGS (every official COCO config: sine-full)
    scale_with_head: bool = True  # attention scale (D/heads)^-1/2; False: D^-1/2 (official S, mmpose's port but L)
    codec: str = TokenPoseHeatmap.name  # CODECS: the targets it was trained with (mmpose's port: UDP)

    def __post_init__(self) -> None:
        if self.variant not in STEM_CHANNELS:
            raise UserError(f"unknown TokenPose variant {self.variant!r}; known: {', '.join(STEM_CHANNELS)}")
        if self.codec not in CODECS:
            raise UserError(f"unknown codec {self.codec!r} for {self.arch}; known: {', '.join(CODECS)}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise UserError(f"unknown TokenPose position embedding {self.pos_embedding!r}; known: "
                            f"{', '.join(POS_EMBEDDINGS)}")
        fh, fw = self.feature_hw
        if fh % self.patch_hw[0] or fw % self.patch_hw[1]:
            raise UserError(f"{self.arch}: a {fh}x{fw} map does not divide into {self.patch_hw[0]}x{self.patch_hw[1]} "
                            f"patches (input {self.input_hw[0]}x{self.input_hw[1]})")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "patch_hw": list(self.patch_hw)}

    @classmethod
    def from_dict(cls, d: dict) -> TokenPoseConfig:
        cfg = super().from_dict(d)
        return cfg if isinstance(cfg.patch_hw, tuple) else _replace(cfg, patch_hw=tuple(cfg.patch_hw))

    @property
    def feature_hw(self) -> tuple[int, int]:
        """(H, W) of the map cut into patches: the image for T, stride 4 for the others."""
        stride = 1 if self.variant == "t" else 4
        return self.input_hw[0] // stride, self.input_hw[1] // stride

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.feature_hw[0] // self.patch_hw[0], self.feature_hw[1] // self.patch_hw[1]

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        return heatmap_hw_for(self.input_hw)


def _replace(cfg: TokenPoseConfig, **changes) -> TokenPoseConfig:
    return dataclasses.replace(cfg, **changes)


def sine_position_embedding(grid_hw: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The fixed 2-D sine encoding, [1, h*w, dim], row-major: D/2 channels from y then D/2 from x, each
    alternating sin and cos of position / temperature^(2*(i//2)/(D/2)), positions normalised to (0, 2 pi]."""
    h, w = grid_hw
    half = dim // 2
    y = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w) / (w + 1e-6) * 2 * math.pi
    freq = temperature ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[..., None] / freq  # [h, w, half]
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat((encode(y), encode(x)), dim=-1).reshape(1, h * w, dim)


class Attention(nn.Module):
    def __init__(self, cfg: TokenPoseConfig):
        super().__init__()
        self.heads = cfg.heads
        self.scale = (cfg.dim // cfg.heads if cfg.scale_with_head else cfg.dim) ** -0.5
        self.to_qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(cfg.dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.to_qkv(x).reshape(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(n, tokens, dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: TokenPoseConfig):
        super().__init__()
        hidden = cfg.dim * cfg.mlp_ratio
        self.net = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    """x + fn(LayerNorm(x)); named `fn.norm` / `fn.fn` as the official Residual(PreNorm(...)) nesting."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = nn.Module()
        self.fn.norm, self.fn.fn = nn.LayerNorm(dim), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn.fn(self.fn.norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TokenPoseConfig):
        super().__init__()
        self.num_keypoints = cfg.num_keypoints
        self.pos_every_block = cfg.pos_embedding == "sine-full"
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(cfg.dim, Attention(cfg)), PreNorm(cfg.dim, FeedForward(cfg))])
            for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: [N, K + patches, D]; pos: [1, patches, D], added to the patch tokens before blocks 2.. (sine-full)."""
        k = self.num_keypoints
        for i, (attn, mlp) in enumerate(self.layers):
            if i > 0 and self.pos_every_block:
                x = torch.cat([x[:, :k], x[:, k:] + pos], dim=1)
            x = mlp(attn(x))
        return x


class TokenPoseBase(nn.Module):
    """Patch tokens + keypoint tokens -> transformer(s) -> MLP head: feature map [N, C, h, w] -> heatmaps.

    For S it also holds the ResNet stem (the official S base module does) and takes the image."""

    def __init__(self, cfg: TokenPoseConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.variant == "s":
            self.conv1, self.bn1, self.conv2, self.bn2, self.layer1 = resnet_stem()
        patches = math.prod(cfg.grid_hw)
        self.keypoint_token = nn.Parameter(torch.zeros(1, cfg.num_keypoints, cfg.dim))
        if cfg.pos_embedding == "learnable":
            self.pos_embedding = nn.Parameter(torch.zeros(1, patches + cfg.num_keypoints, cfg.dim))
        else:  # fixed; a buffer here, a frozen Parameter there: the same state-dict entry
            self.register_buffer("pos_embedding", sine_position_embedding(cfg.grid_hw, cfg.dim))
        channels = STEM_CHANNELS[cfg.variant]
        self.patch_to_embedding = nn.Linear(channels * math.prod(cfg.patch_hw), cfg.dim)
        if cfg.variant == "l":
            self.transformer1, self.transformer2, self.transformer3 = (Transformer(cfg) for _ in range(3))
        else:
            self.transformer = Transformer(cfg)
        width = cfg.dim * (3 if cfg.variant == "l" else 1)
        out = math.prod(cfg.heatmap_hw)
        hidden = cfg.hidden_heatmap_dim
        self.mlp_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out)) if hidden is None else \
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, out))

    def tokens(self, feature: torch.Tensor) -> torch.Tensor:
        """feature [N, C, H, W] -> [N, K + patches, D]: patches flattened (row, column, channel), embedded."""
        n, c, h, w = feature.shape
        ph, pw = self.cfg.patch_hw
        x = feature.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, ph * pw * c)
        x = self.patch_to_embedding(x)
        keypoints = self.keypoint_token.expand(n, -1, -1)
        if self.cfg.pos_embedding == "learnable":
            return torch.cat([keypoints, x], dim=1) + self.pos_embedding[:, :x.shape[1] + keypoints.shape[1]]
        return torch.cat([keypoints, x + self.pos_embedding[:, :x.shape[1]]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.variant == "s":
            x = run_resnet_stem(self, x)
        x = self.tokens(x)
        k, pos = self.cfg.num_keypoints, self.pos_embedding
        if self.cfg.variant == "l":
            x1 = self.transformer1(x, pos)
            x2 = self.transformer2(x1, pos)
            x3 = self.transformer3(x2, pos)
            out = torch.cat([x1[:, :k], x2[:, :k], x3[:, :k]], dim=2)
        else:
            out = self.transformer(x, pos)[:, :k]
        return self.mlp_head(out).reshape(out.shape[0], k, *self.cfg.heatmap_hw)


class TokenPose(nn.Module):
    """TokenPose top-down model: images [N, 3, H, W] (ImageNet-normalised RGB) -> heatmaps [N, K, H/4, W/4]."""

    kind = KIND

    def __init__(self, config: TokenPoseConfig):
        super().__init__()
        self.config = config
        if config.variant in HRNET_WIDTH:
            self.pre_feature = HRNetStage3(HRNET_WIDTH[config.variant])
        base = TokenPoseBase(config)
        if config.variant == "s":
            self.features = base
        else:
            self.transformer = base

    @property
    def codec(self) -> Codec:
        """The targets and decoding it was trained with: TokenPose's own pipeline (not UDP) for the official code's
        models, UDP for mmpose's port; sigma 2 at its heatmap size."""
        return CODECS[self.config.codec](tuple(self.config.input_hw), tuple(self.config.heatmap_hw), DEFAULT_SIGMA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.variant == "s":
            return self.features(x)
        if self.config.variant in HRNET_WIDTH:
            x = self.pre_feature(x)
        return self.transformer(x)


# Official sizes from experiments/coco/tokenpose/*.yaml (256x192; hidden heatmap width 64*48 // 8 = 384 in
# T, S and B; L's 3*192 = 576 wide tokens exceed half of its 384, so its head is one Linear).
ARCHS: dict[str, TokenPoseConfig] = {
    "tokenpose-t": TokenPoseConfig("tokenpose-t", "t", 192, 12, 16, (16, 12)),
    "tokenpose-s": TokenPoseConfig("tokenpose-s", "s", 192, 12, 8, (4, 3), scale_with_head=False),  # S-v1
    "tokenpose-s-v2": TokenPoseConfig("tokenpose-s-v2", "s", 192, 12, 8, (2, 2), scale_with_head=False),
    "tokenpose-b": TokenPoseConfig("tokenpose-b", "b", 192, 12, 8, (4, 3)),
    "tokenpose-l": TokenPoseConfig("tokenpose-l", "l", 192, 8, 12, (4, 3), hidden_heatmap_dim=None),  # L/D24
    # A small CPU-trainable teacher for demos and tests (not official): S's layout (the ResNet stem's features
    # give the tokens a spatial start; a T-sized nano on raw pixel patches fits 32 people to 60 AP in 400 epochs
    # but learns little in a CPU budget), fewer and narrower blocks.
    "tokenpose-nano": TokenPoseConfig("tokenpose-nano", "s", 96, 4, 4, (4, 3), hidden_heatmap_dim=None,
                                      scale_with_head=False),
}


def tokenpose_config(arch: str, input_hw: tuple[int, int] = DEFAULT_INPUT_HW) -> TokenPoseConfig:
    """Preset by name at a crop size: T, S and B's head hidden width follows the heatmap (h*w // 8)."""
    if arch not in ARCHS:
        raise UserError(f"unknown TokenPose architecture {arch!r}; known: {', '.join(ARCHS)}")
    preset = ARCHS[arch]
    hidden = preset.hidden_heatmap_dim
    if hidden is not None:
        hidden = math.prod(heatmap_hw_for(input_hw)) // 8
        hidden = hidden if preset.dim <= hidden * 0.5 else None  # the official rule for one or two layers
    return _replace(preset, input_hw=tuple(input_hw), hidden_heatmap_dim=hidden)


def build_tokenpose(cfg: TokenPoseConfig) -> TokenPose:
    """A freshly initialised TokenPose (the official INIT: truncated normal 0.02 for Linear weights and the
    keypoint tokens, zero biases, unit LayerNorms; convolutions normal 0.001 as HRNet's init_weights)."""
    model = TokenPose(cfg)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.001)
    base = model.features if cfg.variant == "s" else model.transformer
    nn.init.trunc_normal_(base.keypoint_token, std=0.02)
    if cfg.pos_embedding == "learnable":
        nn.init.trunc_normal_(base.pos_embedding, std=0.02)
    return model
