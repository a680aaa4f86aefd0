"""The ViTPose teacher: a plain ViT backbone plus a heatmap head, with the official parameter names.

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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdcache import teacher_formats as formats
from kdcache.errors import UserError
from kdcache.keypoints import NUM_KEYPOINTS

log = logging.getLogger(__name__)

# The official PatchEmbed pads by 4 + 2 * (ratio // 2 - 1) = 2 for ratio 1 (every released model), so a
# 16x16/stride-16 conv over 256x192 gives a 16x12 grid; the padding changes the weights' meaning.
PATCH_PADDING = 2
HEATMAP_STRIDE = 4  # both heads upsample the patch grid x4: 16x12 -> 64x48


@dataclass(frozen=True)
class ViTPoseConfig:
    """Architecture of one ViTPose model (everything needed to rebuild it from its weights)."""

    arch: str  # preset name ("vitpose-b"), or "vitpose-custom" for inferred sizes with no preset
    embed_dim: int  # channels D of every token
    depth: int  # number of transformer blocks
    num_heads: int  # attention heads; D must divide evenly (not recoverable from weights)
    mlp_ratio: float = 4.0  # MLP hidden width / D
    patch_size: int = 16  # pixels per patch side (conv kernel and stride)
    input_hw: tuple[int, int] = (256, 192)  # crop (H, W) in pixels; decides the pos_embed grid
    head: str = "classic"  # "classic": 2 deconvs + 1x1 conv; "simple": ReLU, bilinear x4, 3x3 conv
    num_keypoints: int = 17  # heatmap channels K
    deconv_channels: int = 256  # filters of each deconv layer (classic head only)
    layer_norm_eps: float = 1e-6  # eps of every LayerNorm (official: 1e-6)
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear from 0); training only

    def __post_init__(self) -> None:
        if self.head not in ("classic", "simple"):
            raise UserError(f"ViTPose head {self.head!r} is unknown; use 'classic' or 'simple'")
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
        return tuple(g * HEATMAP_STRIDE for g in self.grid_hw)

    def to_dict(self) -> dict:
        """Plain-typed dict (JSON- and weights_only-safe)."""
        d = dataclasses.asdict(self)
        d["input_hw"] = list(self.input_hw)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ViTPoseConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"ViTPose config has unknown fields {unknown}; was it written by a newer kdcache?")
        d = dict(d)
        if "input_hw" in d:
            d["input_hw"] = tuple(int(s) for s in d["input_hw"])
        return cls(**d)


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


def vitpose_config(arch: str, head: str = "classic", input_hw: tuple[int, int] = (256, 192)) -> ViTPoseConfig:
    """Preset config by name (`ARCHS`), with the head type and input size chosen."""
    if arch not in ARCHS:
        raise UserError(f"unknown ViTPose architecture {arch!r}; known: {', '.join(ARCHS)}")
    return dataclasses.replace(ARCHS[arch], head=head, input_hw=tuple(input_hw))


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
        x = F.interpolate(F.relu(x), scale_factor=HEATMAP_STRIDE, mode="bilinear", align_corners=False)
        return self.final_layer(x)


class ViTPose(nn.Module):
    """ViTPose top-down model: images [N, 3, H, W] (ImageNet-normalised RGB) -> heatmaps [N, K, H/4, W/4]."""

    def __init__(self, config: ViTPoseConfig):
        super().__init__()
        self.config = config
        self.backbone = ViTBackbone(config)
        self.keypoint_head = ClassicHead(config) if config.head == "classic" else SimpleHead(config)

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


def resize_pos_embed(pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of pos_embed [1, 1 + Hs*Ws, D] over its 2-D grid; the extra first slot is kept."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, *src_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def _guess_grid(num_patches: int, hint: tuple[int, int] | None) -> tuple[int, int]:
    """Patch grid of a checkpoint's pos_embed: the hint if it fits, else the factorisation closest to 4:3."""
    if hint is not None and math.prod(hint) == num_patches:
        return tuple(hint)
    pairs = [(h, num_patches // h) for h in range(1, num_patches + 1) if num_patches % h == 0]
    return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1] / (4 / 3))))


# Heads per embedding width, from the presets: the weights cannot tell how D is split into heads.
_HEADS_BY_DIM = {cfg.embed_dim: cfg.num_heads for cfg in ARCHS.values()}


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], input_hw: tuple[int, int] | None = None,
                           num_heads: int | None = None, layer_norm_eps: float | None = None) -> ViTPoseConfig:
    """Infer the architecture from official-named weights (shapes only; meta tensors work).

    Width, depth, MLP ratio, patch size, head type, keypoints and deconv width come from key shapes.
    Heads (unless given) come from the official/preset table by width (S=12, B=12, L=16, H=16), else
    width // 64. input_hw defaults to the pos_embed grid (closest to 4:3) times the patch size.
    layer_norm_eps defaults to the official 1e-6 (HuggingFace files state theirs).
    """
    sd = state_dict
    needed = ["backbone.patch_embed.proj.weight", "backbone.pos_embed", "backbone.blocks.0.mlp.fc1.weight",
              "keypoint_head.final_layer.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise UserError(f"not a ViTPose state dict: missing {missing}; expected official key names "
                        "(backbone.*, keypoint_head.*)")
    dim, _, patch, _ = sd["backbone.patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"backbone\.blocks\.(\d+)\.", k)))
    hidden = sd["backbone.blocks.0.mlp.fc1.weight"].shape[0]
    final = sd["keypoint_head.final_layer.weight"]
    preset = next((c for c in ARCHS.values() if (c.embed_dim, c.depth) == (dim, depth)), None)
    if "keypoint_head.deconv_layers.0.weight" in sd:
        if "keypoint_head.deconv_layers.6.weight" in sd:
            raise UserError("this checkpoint's head has more than 2 deconv layers; kdcache supports "
                            "ViTPose's classic (2 deconvs) and simple heads")
        head, deconv = "classic", sd["keypoint_head.deconv_layers.0.weight"].shape[1]
    else:  # the simple head has no deconvs; keep the preset's (unused) value so configs compare equal
        head, deconv = "simple", (preset or ViTPoseConfig).deconv_channels
    if input_hw is None:
        grid = _guess_grid(sd["backbone.pos_embed"].shape[1] - 1, None)
        input_hw = (grid[0] * patch, grid[1] * patch)
    heads = num_heads or _HEADS_BY_DIM.get(dim) or max(h for h in range(1, max(1, dim // 64) + 1) if dim % h == 0)
    if num_heads is None and dim not in _HEADS_BY_DIM:
        log.warning("embed_dim %d matches no known ViTPose size; assuming %d attention heads", dim, heads)
    return ViTPoseConfig(
        arch=preset.arch if preset else "vitpose-custom", embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=hidden / dim, patch_size=patch, input_hw=tuple(input_hw), head=head,
        num_keypoints=final.shape[0], deconv_channels=deconv,
        layer_norm_eps=ViTPoseConfig.layer_norm_eps if layer_norm_eps is None else layer_norm_eps,
        drop_path_rate=preset.drop_path_rate if preset else 0.0)


def _key_list(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" ... ({len(keys)} in all)" if len(keys) > 4 else f" ({len(keys)})")


def load_vitpose_weights(model: ViTPose, state_dict: Mapping[str, torch.Tensor],
                         src_grid: tuple[int, int] | None = None, assign: bool = False) -> None:
    """Load official-named weights into `model`, resizing pos_embed to the model's grid if needed.

    Args:
        state_dict: official key names, one head, experts merged (`teacher_formats.teacher_weights` output).
        src_grid: (Hp, Wp) of the weights' pos_embed; guessed (4:3) when not given.
        assign: take the tensors instead of copying them (for a model built on the meta device).
    """
    sd = dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = ([f"missing keys {_key_list(missing)}"] if missing else []) + \
                ([f"unexpected keys {_key_list(unexpected)}"] if unexpected else [])
        raise UserError(f"weights do not fit {model.config.arch} ({model.config.head} head): "
                        f"{'; '.join(parts)}")
    pos = sd["backbone.pos_embed"]
    dst_grid = model.config.grid_hw
    src_grid = _guess_grid(pos.shape[1] - 1, src_grid or dst_grid)
    if src_grid != dst_grid:
        log.info("interpolating pos_embed from a %dx%d to a %dx%d grid", *src_grid, *dst_grid)
        sd["backbone.pos_embed"] = resize_pos_embed(pos, src_grid, dst_grid)
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]
    if wrong:
        raise UserError(f"weights do not fit {model.config.arch}: shape mismatch {_key_list(wrong)}")
    # Same dtypes as the model (a half-precision file still gives an fp32 model); BN step counters
    # are bookkeeping that some converted files drop.
    sd = {k: sd[k].to(v.dtype) if k in sd else torch.zeros_like(v, device="cpu") for k, v in own.items()}
    model.load_state_dict(sd, assign=assign)


def load_teacher(path: str | Path, device: str | torch.device = "cpu", input_hw: tuple[int, int] | None = None,
                 expert: str | int | None = None) -> ViTPose:
    """Load a ViTPose teacher in eval mode from any released weight file or a kdcache checkpoint.

    Accepted: official release files (classic or simple head, S/B/L/H, multi-dataset and ViTPose++ files
    included), a bare state dict of the same keys, a HuggingFace VitPose folder (config.json + safetensors
    or .bin) or weight file, and kdcache checkpoints (`{"format": "kdcache", "kind": "vitpose", ...}`).
    Pickled files are read with `torch.load(weights_only=True)`: a file that would run code is refused.

    Args:
        input_hw: crop (H, W) to run at; default: the checkpoint's own. pos_embed is interpolated
            (bicubic over the patch grid, the extra first slot kept) when it differs.
        expert: ViTPose++ expert to merge, by name (`teacher_formats.VITPOSE_PLUS_DATASETS`) or index;
            default COCO.
    """
    from kdcache.checkpoint import read_checkpoint

    path = Path(path)
    if formats.is_huggingface_path(path):
        weights_file = formats.hf_weight_file(path) if path.is_dir() else path
        tensors = formats.read_hf_tensors(weights_file)
        weights = formats.teacher_weights(tensors, path, expert)  # HF names: config.json found or refused
        return _build_teacher(weights, path, device, input_hw)
    if not path.is_file():
        raise UserError(f"teacher checkpoint {path} does not exist")
    return teacher_from_checkpoint(read_checkpoint(path), path, device, input_hw, expert)


def require_coco_keypoints(teacher: ViTPose, path: Path, expert: str | int | None) -> None:
    """Refuse a teacher (e.g. the AIC or MPII expert of a ViTPose++ file) whose joints are not COCO's 17."""
    if teacher.config.num_keypoints != NUM_KEYPOINTS:
        raise UserError(f"{path} (expert {expert!r}) predicts {teacher.config.num_keypoints} keypoints, not COCO's "
                        f"{NUM_KEYPOINTS}: choose a COCO-keypoint expert (the default, 'coco')")


def teacher_from_checkpoint(obj: object, path: Path, device: str | torch.device = "cpu",
                            input_hw: tuple[int, int] | None = None, expert: str | int | None = None) -> ViTPose:
    """`load_teacher` on an already loaded checkpoint object (`path` names it in messages)."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if obj.get("format") != "kdcache":
        return _build_teacher(formats.teacher_weights(obj, Path(path), expert), path, device, input_hw)
    if obj.get("kind") != "vitpose":
        raise UserError(f"{path} is a kdcache {obj.get('kind')!r} checkpoint, not a ViTPose teacher")
    if expert is not None:  # refused, not ignored: the user asked for a model this file does not hold
        raise UserError(f"--expert {expert!r}: {path} is a kdcache checkpoint of one ViTPose model, without "
                        "ViTPose++ experts; drop --expert")
    cfg = ViTPoseConfig.from_dict(obj["model_config"])
    src_grid = cfg.grid_hw
    if input_hw is not None:
        cfg = dataclasses.replace(cfg, input_hw=tuple(input_hw))
    return _instantiate(cfg, obj["state_dict"], src_grid, path, device)


def _build_teacher(weights: formats.TeacherWeights, path: Path, device: str | torch.device,
                   input_hw: tuple[int, int] | None) -> ViTPose:
    sd = weights.state_dict
    cfg = config_from_state_dict(sd, input_hw or weights.trained_hw, **weights.overrides)
    src_grid = None
    if weights.trained_hw is not None:
        src_grid = tuple(s // cfg.patch_size for s in weights.trained_hw)
    return _instantiate(cfg, sd, src_grid, path, device)


def _instantiate(cfg: ViTPoseConfig, state_dict: Mapping[str, torch.Tensor], src_grid: tuple[int, int] | None,
                 path: Path, device: str | torch.device) -> ViTPose:
    with torch.device("meta"):  # no random init of weights about to be replaced (ViTPose-H: 630M)
        model = ViTPose(cfg)
    load_vitpose_weights(model, state_dict, src_grid, assign=True)
    log.info("loaded %s (%s head, %d keypoints, input %dx%d) from %s", cfg.arch, cfg.head,
             cfg.num_keypoints, *cfg.input_hw, path)
    return model.to(device).eval()
