"""The ViTPose teacher family, as `kdcache.teacher` defines one: KIND, ARCHS, build, claims, claims_path,
weights_file, from_kdcache, from_release and from_path, over the model (`kdcache.vitpose`) and its released file
layouts (`kdcache.vitpose_formats`); and the weight loading they share (architecture inferred from the weights,
position embedding resized to another input size)."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcache import vitpose_formats as formats
from kdcache.checkpoint import key_mismatch, shape_mismatch, unwrap_state_dict
from kdcache.codec import closest_to_4_3, factor_pairs
from kdcache.errors import UserError
from kdcache.vitpose import ARCHS, KIND, ViTPose, ViTPoseConfig, build_vitpose, vitpose_config

__all__ = ["ARCHS", "KIND", "build", "claims", "claims_path", "weights_file", "from_path", "from_release",
           "from_kdcache", "config_from_state_dict", "load_vitpose_weights", "resize_pos_embed"]

log = logging.getLogger(__name__)


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
    return closest_to_4_3(factor_pairs(num_patches))


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


def load_vitpose_weights(model: ViTPose, state_dict: Mapping[str, torch.Tensor],
                         src_grid: tuple[int, int] | None = None, assign: bool = False) -> None:
    """Load official-named weights into `model`, resizing pos_embed to the model's grid if needed.

    Args:
        state_dict: official key names, one head, experts merged (`vitpose_formats.teacher_weights` output).
        src_grid: (Hp, Wp) of the weights' pos_embed; guessed (4:3) when not given.
        assign: take the tensors instead of copying them (for a model built on the meta device).
    """
    sd = dict(state_dict)
    own = model.state_dict()
    if problem := key_mismatch(own, sd):
        raise UserError(f"weights do not fit {model.config.arch} ({model.config.head} head): {problem}")
    pos = sd["backbone.pos_embed"]
    dst_grid = model.config.grid_hw
    src_grid = _guess_grid(pos.shape[1] - 1, src_grid or dst_grid)
    if src_grid != dst_grid:
        log.info("interpolating pos_embed from a %dx%d to a %dx%d grid", *src_grid, *dst_grid)
        sd["backbone.pos_embed"] = resize_pos_embed(pos, src_grid, dst_grid)
    if problem := shape_mismatch(own, sd):
        raise UserError(f"weights do not fit {model.config.arch}: {problem}")
    # Same dtypes as the model (a half-precision file still gives an fp32 model); BN step counters
    # are bookkeeping that some converted files drop.
    sd = {k: sd[k].to(v.dtype) if k in sd else torch.zeros_like(v, device="cpu") for k, v in own.items()}
    model.load_state_dict(sd, assign=assign)


# ---- the family's loaders (kdcache.teacher calls these) ---------------------------------------------------


def build(arch: str, head: str, input_hw: tuple[int, int], num_keypoints: int = 17) -> ViTPose:
    """A freshly initialised preset (`ARCHS`) predicting `num_keypoints` joints, for train-teacher."""
    return build_vitpose(dataclasses.replace(vitpose_config(arch, head=head, input_hw=input_hw),
                                             num_keypoints=num_keypoints))


def claims(obj: Mapping) -> bool:
    """Whether a checkpoint object (not kdcache's) holds ViTPose weights: official or HuggingFace names."""
    try:
        sd = unwrap_state_dict(obj, Path("<checkpoint>"))
    except UserError:
        return False
    # mmpose's TokenPose port also names everything backbone.*: its keypoint tokens tell it apart.
    return formats.is_huggingface(sd) or (any(k.startswith(("backbone.", "keypoint_head.")) for k in sd)
                                          and "backbone.keypoint_token" not in sd)


def claims_path(path: Path) -> bool:
    """Whether `path` is a file layout this family reads itself: a HuggingFace VitPose folder or weight file."""
    return formats.is_huggingface_path(path)


def weights_file(path: Path) -> Path:
    """The file whose bytes are the weights of a path `claims_path` accepts (a folder's weight file)."""
    return formats.hf_weight_file(path) if path.is_dir() else path


def from_path(path: Path, device: str | torch.device, input_hw: tuple[int, int] | None,
              expert: str | int | None) -> ViTPose:
    """A HuggingFace VitPose folder, safetensors file or sharded index (`claims_path`)."""
    tensors = formats.read_hf_tensors(weights_file(path))
    weights = formats.teacher_weights(tensors, path, expert)  # HF names: config.json found or refused
    return _build_teacher(weights, path, device, input_hw)


def from_release(obj: Mapping, path: Path, device: str | torch.device, input_hw: tuple[int, int] | None,
                 expert: str | int | None) -> ViTPose:
    """An official release file, ViTPose++ file, bare state dict or HuggingFace .bin, already read."""
    return _build_teacher(formats.teacher_weights(obj, Path(path), expert), path, device, input_hw)


def from_kdcache(obj: Mapping, path: Path, device: str | torch.device, input_hw: tuple[int, int] | None,
                 expert: str | int | None) -> ViTPose:
    """A kdcache checkpoint of this family (its stored config wins over what the weights suggest)."""
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
