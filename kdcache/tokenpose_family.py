"""The TokenPose teacher family, as `kdcache.teacher` defines one: KIND, ARCHS, build, claims, claims_path,
weights_file, from_kdcache, from_release and from_path, over the model (`kdcache.tokenpose`).

Files: what the official code (github leeyegy/TokenPose, `tools/train.py`) saves, `final_state.pth` (a bare
state dict, possibly with `module.` prefixes) or `checkpoint.pth` (`{'state_dict': ...}`); the maintainers
published no weights (TokenPose issues #4, #5, #6). Also mmpose's port (`mmpose/models/backbones/tokenpose.py`
with `configs/body_2d_keypoint/topdown_heatmap/coco/td-hm_TokenPose-*`): a `backbone.*` TokenPose whose
heatmap head is inside the backbone, trained with mmpose's UDPHeatmap codec, and whose T, S and B attention
is scaled by D^-1/2 (it builds their transformer without `scale_with_head`; L keeps it). Its names are mapped
to the official ones and the two differences become the model's `scale_with_head` and `codec`.

The architecture is read from the shapes: the variant from the module names, width, depth, MLP ratio and head
from their weights, the crop size from the heatmap the head writes (4:3, as every official config), the patch
size from the patch embedding and the sine grid. Only the attention heads are not in the weights: they come from
the official configs by variant (T 16, S 8, B 8, L 12).
TokenPose runs only at the size it was trained at: its patch grid and its heatmap head are fixed by it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from kdcache.checkpoint import key_list, key_mismatch, rename_keys, shape_mismatch, unwrap_state_dict
from kdcache.codec import UDPHeatmap, closest_to_4_3, factor_pairs
from kdcache.errors import UserError
from kdcache.tokenpose import ARCHS, HRNET_WIDTH, KIND, STEM_CHANNELS, TokenPose, TokenPoseConfig, build_tokenpose, \
    tokenpose_config

__all__ = ["ARCHS", "KIND", "build", "claims", "claims_path", "weights_file", "from_path", "from_release",
           "from_kdcache", "config_from_state_dict"]

log = logging.getLogger(__name__)

HEADS_BY_VARIANT = {"t": 16, "s": 8, "b": 8, "l": 12}  # experiments/coco/tokenpose/*.yaml TRANSFORMER_HEADS
_BASES = ("transformer.", "features.")


def _base(sd: Mapping[str, torch.Tensor]) -> str | None:
    return next((b for b in _BASES if b + "keypoint_token" in sd), None)


def _variant(sd: Mapping[str, torch.Tensor], base: str) -> str:
    if base == "features.":
        return "s"
    three = base + "transformer1.layers.0.0.fn.norm.weight" in sd
    if "pre_feature.conv1.weight" not in sd:
        if three:
            raise UserError("TokenPose file with three transformers (L) but no HRNet (pre_feature.*)")
        return "t"
    width = sd["pre_feature.transition1.0.0.weight"].shape[0]
    variant = "l" if three else "b"
    if width != HRNET_WIDTH[variant]:
        raise UserError(f"TokenPose-{variant.upper()} file with an HRNet-W{width} in front; the official "
                        f"{variant.upper()} uses HRNet-W{HRNET_WIDTH[variant]}")
    return variant


def _patch_hw(feature_hw: tuple[int, int], patch_pixels: int, slots: int,
              keypoints: int) -> tuple[tuple[int, int], str]:
    """Patch (h, w) and position embedding kind that explain `slots` positions over a `feature_hw` map.

    Every divisor pair of `patch_pixels` that tiles the map gives the same count, so the shape closest to 4:3 is
    taken, as every official config's (16x12, 4x3, 6x4 at 384x288; 2x2 is the closest for 4 pixels)."""
    fh, fw = feature_hw
    tiling = [(ph, pw) for ph, pw in factor_pairs(patch_pixels) if fh % ph == 0 and fw % pw == 0]
    for kind, grid in (("sine-full", slots), ("learnable", slots - keypoints)):
        fits = [(ph, pw) for ph, pw in tiling if (fh // ph) * (fw // pw) == grid]
        if fits:
            return closest_to_4_3(fits), kind
    raise UserError(f"TokenPose weights: no patch size cuts a {fh}x{fw} map into {slots} positions "
                    f"({patch_pixels} pixels per patch)")


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> TokenPoseConfig:
    """Infer the architecture from official-named TokenPose weights (shapes only)."""
    base = _base(sd)
    if base is None:
        raise UserError("not a TokenPose state dict: no transformer.keypoint_token or features.keypoint_token")
    variant = _variant(sd, base)
    _, keypoints, dim = sd[base + "keypoint_token"].shape
    blocks = base + ("transformer1" if variant == "l" else "transformer") + ".layers."
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(re.escape(blocks) + r"(\d+)\.", k)))
    mlp_ratio = sd[blocks + "0.1.fn.fn.net.0.weight"].shape[0] // dim
    two_layers = base + "mlp_head.3.weight" in sd
    out = sd[base + ("mlp_head.3.weight" if two_layers else "mlp_head.1.weight")].shape[0]
    hidden = sd[base + "mlp_head.1.weight"].shape[0] if two_layers else None
    heatmap_hw = closest_to_4_3(factor_pairs(out))  # every official config's heatmap is 4:3
    input_hw = (4 * heatmap_hw[0], 4 * heatmap_hw[1])
    stride = 1 if variant == "t" else 4
    patch_pixels = sd[base + "patch_to_embedding.weight"].shape[1] // STEM_CHANNELS[variant]
    slots = sd[base + "pos_embedding"].shape[1] if base + "pos_embedding" in sd else None
    if slots is None:
        raise UserError(f"TokenPose weights without {base}pos_embedding: the patch size cannot be read")
    patch_hw, pos = _patch_hw((input_hw[0] // stride, input_hw[1] // stride), patch_pixels, slots, keypoints)
    cfg = TokenPoseConfig("tokenpose-custom", variant, dim, depth, HEADS_BY_VARIANT[variant], patch_hw, mlp_ratio,
                          input_hw, keypoints, hidden, pos, scale_with_head=variant != "s")
    # A preset with this shape gives its heads (the official ones, or a CPU preset's own).
    unsized = dict(arch=cfg.arch, heads=cfg.heads, input_hw=input_hw, num_keypoints=keypoints,
                   hidden_heatmap_dim=hidden)
    preset = next((p for p in ARCHS.values() if dataclasses.replace(p, **unsized) == cfg), None)
    if preset is None:
        log.info("TokenPose weights match no preset; assuming the official %d heads of variant %s", cfg.heads,
                 variant.upper())
        return cfg
    return dataclasses.replace(cfg, arch=preset.arch, heads=preset.heads)


def _load(cfg: TokenPoseConfig, sd: Mapping[str, torch.Tensor], path: Path, device: str | torch.device) -> TokenPose:
    with torch.device("meta"):
        model = TokenPose(cfg)
    own = model.state_dict()
    if problem := key_mismatch(own, sd) or shape_mismatch(own, sd):
        raise UserError(f"{path}: weights do not fit {cfg.arch}: {problem}")
    state = {k: sd[k].to(v.dtype) if k in sd else torch.zeros(v.shape, dtype=v.dtype) for k, v in own.items()}
    model.load_state_dict(state, assign=True)
    log.info("loaded %s (TokenPose-%s, %d keypoints, input %dx%d) from %s", cfg.arch, cfg.variant.upper(),
             cfg.num_keypoints, *cfg.input_hw, path)
    return model.to(device).eval()


def _fixed_size(cfg: TokenPoseConfig, input_hw: tuple[int, int] | None, path: Path) -> None:
    if input_hw is not None and tuple(input_hw) != tuple(cfg.input_hw):
        raise UserError(f"{path}: TokenPose runs only at the size it was trained at, "
                        f"{cfg.input_hw[0]}x{cfg.input_hw[1]} "
                        f"(its patch grid and heatmap head are fixed by it), not {input_hw[0]}x{input_hw[1]}")


def _no_expert(expert: str | int | None, path: Path) -> None:
    if expert is not None:  # refused, not ignored: the user asked for a model this file does not hold
        raise UserError(f"--expert {expert!r}: {path} is a TokenPose file, without ViTPose++ experts; drop --expert")


# ---- the family's loaders (kdcache.teacher calls these) ---------------------------------------------------


def build(arch: str, head: str, input_hw: tuple[int, int], num_keypoints: int = 17) -> TokenPose:
    """A freshly initialised preset (`ARCHS`), for train-teacher. TokenPose has one head: `head` must be the
    default ("classic"), which names no choice here."""
    if head != "classic":
        raise UserError(f"--head {head}: TokenPose has one head (its MLP); drop --head")
    return build_tokenpose(dataclasses.replace(tokenpose_config(arch, input_hw), num_keypoints=num_keypoints))


def claims(obj: Mapping) -> bool:
    """Whether a checkpoint object (not kdcache's) holds official TokenPose weights."""
    try:
        sd = unwrap_state_dict(obj, Path("<checkpoint>"))
    except UserError:
        return False
    return _base(sd) is not None or is_mmpose_port(sd)


def claims_path(path: Path) -> bool:
    """TokenPose has no folder layouts: every file is a checkpoint `claims` reads."""
    return False


def weights_file(path: Path) -> Path:
    return path


def from_path(path: Path, device: str | torch.device, input_hw: tuple[int, int] | None,
              expert: str | int | None) -> TokenPose:
    raise UserError(f"{path}: TokenPose weights come as one checkpoint file")


def from_release(obj: Mapping, path: Path, device: str | torch.device, input_hw: tuple[int, int] | None,
                 expert: str | int | None) -> TokenPose:
    """A file of the official code (`final_state.pth`, `checkpoint.pth`, `model_best.pth`) or of mmpose's port,
    already read."""
    _no_expert(expert, path)
    sd = unwrap_state_dict(obj, Path(path))
    if is_mmpose_port(sd):
        sd, scale_with_head = from_mmpose_port(sd, Path(path))
        cfg = config_from_state_dict(sd)
        cfg = dataclasses.replace(cfg, arch=f"{cfg.arch}-mmpose", scale_with_head=scale_with_head,
                                  codec=UDPHeatmap.name)
    else:
        cfg = config_from_state_dict(sd)
    _fixed_size(cfg, input_hw, path)
    return _load(cfg, sd, path, device)


def from_kdcache(obj: Mapping, path: Path, device: str | torch.device, input_hw: tuple[int, int] | None,
                 expert: str | int | None) -> TokenPose:
    """A kdcache checkpoint of this family (its stored config wins over what the weights suggest)."""
    _no_expert(expert, path)
    cfg = TokenPoseConfig.from_dict(obj["model_config"])
    _fixed_size(cfg, input_hw, path)
    return _load(cfg, obj["state_dict"], path, device)


# ---- mmpose's port --------------------------------------------------------------------------------------------

# (port name, official name), the first match wins; `{base}` is features. (S) or transformer.
_PORT_RENAMES = [
    (r"^backbone\.(keypoint_token|pos_embedding)$", r"{base}\1"),
    (r"^backbone\.patch_to_embedding\.", "{base}patch_to_embedding."),
    (r"^backbone\.(transformer[123]?)\.layers\.", r"{base}\1.layers."),
    (r"^backbone\.layers\.1\.", "{base}mlp_head."),  # layers = [stem or HRNet, mlp head]
    # S's stem: Sequential(conv, BN, ReLU, conv, BN, ReLU, layer1)
    (r"^backbone\.layers\.0\.0\.", "features.conv1."),
    (r"^backbone\.layers\.0\.1\.", "features.bn1."),
    (r"^backbone\.layers\.0\.3\.", "features.conv2."),
    (r"^backbone\.layers\.0\.4\.", "features.bn2."),
    (r"^backbone\.layers\.0\.6\.", "features.layer1."),
    (r"^backbone\.pre_feature\.", "pre_feature."),  # mmpose's HRNet: our names (conv1, bn1, transition1, ...)
]
# Built by mmpose's HRNet but unused by the port's stage-3 forward: stage 4, and stage 3's last fusions into
# branches 1 and 2 (only branch 0 is returned).
_PORT_UNUSED = r"backbone\.pre_feature\.(transition3|stage4)\.|backbone\.pre_feature\.stage3\.3\.fuse_layers\.[12]\."


def is_mmpose_port(sd: Mapping[str, torch.Tensor]) -> bool:
    return "backbone.keypoint_token" in sd


def from_mmpose_port(sd: Mapping[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """mmpose port names -> official names; also whether its attention is scaled by (D/heads)^-1/2 (L only)."""
    hrnet = "backbone.pre_feature.conv1.weight" in sd
    stem = "backbone.layers.0.0.weight" in sd and not hrnet
    base = "features." if stem else "transformer."
    # With an HRNet, layers.0 is that HRNet registered a second time.
    drop = "^(" + _PORT_UNUSED + (r"|backbone\.layers\.0\." if hrnet else "") + ")"
    out, unknown = rename_keys(sd, [(p, t.format(base=base)) for p, t in _PORT_RENAMES], drop)
    if unknown:
        raise UserError(f"{path}: keys that mmpose's TokenPose port does not have: {key_list(unknown)}")
    head_scaled = base + "transformer1.layers.0.0.fn.norm.weight" in out  # L, the port's only head-scaled one
    log.info("mmpose TokenPose port: renamed to the official layout (UDP codec, attention scale %s)",
             "(D/heads)^-1/2" if head_scaled else "D^-1/2")
    return out, head_scaled

