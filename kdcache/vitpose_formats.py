"""Released ViTPose weight files -> one official-named state dict for `kdcache.vitpose.ViTPose`.

What arrives, and what this module does with it:

- official release files `{'state_dict' | 'model' | 'module': {...}}`, possibly with a `module.` prefix
  (ViTAE-Transformer/ViTPose `mmcv_custom/checkpoint.py` unwraps the same three keys): unwrapped;
- multi-dataset files (`backbone.cls_token`, `associate_keypoint_heads.*`): the extras are dropped, with a
  note in the log;
- ViTPose++ files (`mmpose/models/backbones/vit_moe.py`): every block's MLP is a shared `fc2` with
  D - part_features outputs plus one `experts.{k}` Linear with part_features outputs per dataset, concatenated.
  One expert is merged into `fc2` exactly as `tools/model_split.py` does (COCO by default), and for a
  non-COCO expert the matching `associate_keypoint_heads.{k-1}` becomes the head;
- mmpose 1.x files (its model zoo's `td-hm_ViTPose-{small,base,large,huge}[-simple]_...` checkpoints):
  mmcls / mmpretrain's `VisionTransformer` (`backbone.layers.{i}.{ln1,attn,ln2,ffn}`, final norm `backbone.ln1`,
  patch conv `patch_embed.projection` with padding 2) and mmpose's `HeatmapHead` (`head.*`; the simple decoder's
  ReLU and bilinear x4 are its `FeatureMapProcessor` neck, which has no weights): renamed to the official names.
  One semantic difference: built with `with_cls_token=False`, that ViT adds only the patch positions of
  `pos_embed` (mmcls 1.x adds the class slot to the class token and then drops both; mmpretrain drops the slot
  when loading), where the official ViTPose adds the class slot to every patch. The slot becomes zeros, so
  the official forward computes mmpose 1.x's function;
- HuggingFace `VitPoseForPoseEstimation` weights (`transformers/models/vitpose{,_backbone}`): renamed to the
  official names (q/k/v concatenated back into qkv), with the architecture facts that only its
  `config.json` holds (heads, LayerNorm epsilon, trained input size). Without that file they are refused:
  the head type shows in the key names, but no weight reveals the heads or the epsilon, and a guess builds
  another function.

`expert` means something only for a file that still holds ViTPose++ experts; for any other it is refused
rather than ignored (the user asked for a model that the file does not contain).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdcache.checkpoint import key_list, read_state_dict, rename_keys, unwrap_state_dict
from kdcache.errors import UserError

log = logging.getLogger(__name__)

# Expert / dataset_idx order of the released ViTPose++ files, as the official configs
# (configs/body/.../coco/vitPose+_*_coco+aic+mpii+ap10k+apt36k+wholebody_256x192_udp.py) number them;
# tools/model_split.py writes coco.pth from expert 0 and aic/mpii/ap10k/apt36k/wholebody.pth from 1..5.
VITPOSE_PLUS_DATASETS = ("coco", "aic", "mpii", "ap10k", "apt36k", "wholebody")
# The keypoint set each expert predicts (`kdcache.keypoints`). APT-36K has AP-10K's 17 animal keypoints: ViTPose's
# configs describe both with `configs/_base_/datasets/ap10k_info.py` (there is no apt36k_info).
EXPERT_KEYPOINT_SETS = {"coco": "coco-17", "aic": "aic-14", "mpii": "mpii-16", "ap10k": "ap10k-17",
                        "apt36k": "ap10k-17", "wholebody": "coco-wholebody-133"}

# The defaults of transformers' VitPoseConfig / VitPoseBackboneConfig: `save_pretrained` writes only the
# values that differ from them, so a key missing from config.json means this value.
HF_BACKBONE_DEFAULTS = {"image_size": [256, 192], "patch_size": [16, 16], "num_attention_heads": 12,
                        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "qkv_bias": True}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")

_EXTRAS = re.compile(r"^(associate_keypoint_heads\.|backbone\.cls_token$)")
_EXPERT = re.compile(r"^backbone\.blocks\.(\d+)\.mlp\.experts\.(\d+)\.(weight|bias)$")


@dataclass(frozen=True)
class TeacherWeights:
    """Weights in official names, ready for `ViTPose`, plus what the file says that the shapes cannot."""

    state_dict: dict[str, torch.Tensor]  # official names; one MLP per block, one head, no extras
    overrides: dict = field(default_factory=dict)  # ViTPoseConfig fields: num_heads, layer_norm_eps
    trained_hw: tuple[int, int] | None = None  # crop (H, W) the file was made for, when it says


def is_huggingface(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("backbone.embeddings.", "backbone.encoder.", "head.deconv1.", "head.conv.")) for k in sd)


def is_mmpose1(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("backbone.layers.", "backbone.patch_embed.projection.", "head.final_layer.")) for k in sd)


def teacher_weights(obj: Mapping, path: Path, expert: str | int | None = None,
                    hf_config: Mapping | None = None) -> TeacherWeights:
    """Any supported weight file's content (already read) -> `TeacherWeights`.

    Args:
        obj: the loaded checkpoint object, or a bare state dict.
        path: where it came from (for messages, and to find a HuggingFace config.json next to it).
        expert: ViTPose++ expert to merge: a name from `VITPOSE_PLUS_DATASETS` or an index; default COCO.
        hf_config: the parsed config.json of HuggingFace weights (found next to `path` when not given).
    """
    sd = unwrap_state_dict(obj, path)
    overrides, trained_hw = {}, None
    if is_mmpose1(sd):
        sd = from_mmpose1(sd, path)
    elif is_huggingface(sd):
        if hf_config is None:
            hf_config = find_hf_config(path)
        sd, overrides, trained_hw = from_huggingface(sd, hf_config, path)
    sd = merge_expert(sd, expert, path)
    extras = sorted(k for k in sd if _EXTRAS.match(k))
    if extras:
        used = "COCO" if expert in (None, 0, "0", "coco") else f"--expert {expert}"
        log.info("ignoring %d multi-dataset keys not used by the %s model (%s, ...)", len(extras), used, extras[0])
    return TeacherWeights({k: v for k, v in sd.items() if not _EXTRAS.match(k)}, overrides, trained_hw)


def expert_index(expert: str | int | None, num_experts: int) -> int:
    """Index of `expert` (None -> COCO, 0) among the `num_experts` of a ViTPose++ file."""
    if expert is None:
        index = 0
    elif isinstance(expert, int) or str(expert).isdigit():
        index = int(expert)
    elif str(expert).lower() in VITPOSE_PLUS_DATASETS:
        index = VITPOSE_PLUS_DATASETS.index(str(expert).lower())
    else:
        raise UserError(f"unknown ViTPose++ expert {expert!r}; use an index or one of "
                        f"{', '.join(VITPOSE_PLUS_DATASETS)}")
    if not 0 <= index < num_experts:
        raise UserError(f"expert {expert!r} (index {index}) is not in this file: it has {num_experts} experts")
    return index


def expert_keypoint_set(expert: str | int) -> str | None:
    """The name of the keypoint set a ViTPose++ expert (by name or index) predicts; None for an index beyond
    the released six."""
    if isinstance(expert, int) or str(expert).isdigit():
        index = int(expert)
        return EXPERT_KEYPOINT_SETS[VITPOSE_PLUS_DATASETS[index]] if index < len(VITPOSE_PLUS_DATASETS) else None
    return EXPERT_KEYPOINT_SETS.get(str(expert).lower())


def merge_expert(sd: dict[str, torch.Tensor], expert: str | int | None, path: Path) -> dict[str, torch.Tensor]:
    """Fold one ViTPose++ expert into every block's `mlp.fc2` (rows: shared, then the expert's part).

    A file already split by `tools/model_split.py` has a full-width `fc2` and the unused experts left in
    it: those are dropped. Files without experts come back unchanged. In both, an `expert` is refused:
    the file holds one model, and which dataset's it is cannot be read from it.
    """
    expert_keys = {k: m for k in sd if (m := _EXPERT.match(k))}
    if not expert_keys:
        if expert is not None:
            raise UserError(f"--expert {expert!r}: {path} is a plain ViTPose file, without ViTPose++ experts; "
                            "drop --expert (it only selects an expert of a ViTPose++ multi-expert file)")
        return sd
    parts = {(int(m.group(1)), int(m.group(2)), m.group(3)): sd[k] for k, m in expert_keys.items()}
    sd = {k: v for k, v in sd.items() if k not in expert_keys}
    num_experts = 1 + max(index for _, index, _ in parts)
    dim = sd["backbone.pos_embed"].shape[-1] if "backbone.pos_embed" in sd else None
    fc2 = sd.get("backbone.blocks.0.mlp.fc2.weight")
    if dim is not None and fc2 is not None and fc2.shape[0] == dim:
        if expert is not None:
            raise UserError(f"--expert {expert!r}: {path} is a ViTPose++ file already split to one dataset's model "
                            "(its fc2 holds one merged expert, as tools/model_split.py writes); drop --expert")
        log.info("ignoring the %d unmerged expert tensors of an already split ViTPose++ file", len(parts))
        return sd
    index = expert_index(expert, num_experts)
    for block in sorted({b for b, _, _ in parts}):
        for kind in ("weight", "bias"):
            key, part = f"backbone.blocks.{block}.mlp.fc2.{kind}", parts.get((block, index, kind))
            if key not in sd or part is None:
                raise UserError(f"ViTPose++ file is incomplete: block {block} lacks {key} or expert {index}'s {kind}")
            sd[key] = torch.cat([sd[key], part], dim=0)
    if dim is not None and sd["backbone.blocks.0.mlp.fc2.weight"].shape[0] != dim:
        raise UserError(f"ViTPose++ fc2 + expert give {sd['backbone.blocks.0.mlp.fc2.weight'].shape[0]} "
                        f"channels, the model has {dim}")
    name = VITPOSE_PLUS_DATASETS[index] if index < len(VITPOSE_PLUS_DATASETS) else str(index)
    if index > 0:
        _use_associate_head(sd, index, name)
    log.info("ViTPose++ file: merged expert %d (%s) of %d into fc2", index, name, num_experts)
    return sd


def _use_associate_head(sd: dict[str, torch.Tensor], index: int, name: str) -> None:
    """Expert k > 0 is trained with associate_keypoint_heads.{k-1}: make it the head (as model_split.py does)."""
    prefix = f"associate_keypoint_heads.{index - 1}."
    head = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not head:
        log.warning("no head for expert %d (%s) in this file; keeping the COCO keypoint_head", index, name)
        return
    for k in [k for k in sd if k.startswith("keypoint_head.")]:
        del sd[k]
    sd.update({"keypoint_head." + k: v for k, v in head.items()})


# ---------------------------------------------------------------------------------------------------------
# HuggingFace VitPoseForPoseEstimation


def is_huggingface_path(path: Path) -> bool:
    """A HuggingFace VitPose folder, safetensors file or sharded-weights index (not a pickled checkpoint)."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors" or path.name.endswith(".index.json")


def hf_weight_file(folder: Path) -> Path:
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} is a folder without ViTPose weights; expected a HuggingFace VitPose folder "
                    f"({' or '.join(HF_WEIGHT_FILES[::2])} next to config.json)")


def find_hf_config(path: Path) -> dict:
    """config.json of a HuggingFace folder or of the folder holding a weight file.

    Raises:
        UserError: it is missing. Without it the head type is still known (from the key names), but the
            attention heads and the LayerNorm epsilon are not: defaults built a visibly different function.
    """
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        raise UserError(f"{path} holds HuggingFace VitPose weights but {config} is missing: the attention heads "
                        "and LayerNorm epsilon are not in the weights; put the model's config.json beside them")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{config} is not valid JSON") from None
    if data.get("model_type", "vitpose") != "vitpose":
        raise UserError(f"{config} describes a {data.get('model_type')!r} model, not a HuggingFace VitPose")
    return data


def read_hf_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """Tensors of a HuggingFace weight file: safetensors, a weights_only torch .bin, or a sharded index."""
    if weights.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"{weights} is not a HuggingFace shard index (no weight_map)") from None
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read_hf_tensors(weights.parent / shard))
        return out
    if not weights.is_file():
        raise UserError(f"HuggingFace weight file {weights} does not exist")
    return read_state_dict(weights)


def from_huggingface(sd: Mapping[str, torch.Tensor], config: Mapping, path: Path
                     ) -> tuple[dict[str, torch.Tensor], dict, tuple[int, int]]:
    """HuggingFace VitPose names -> official names (the inverse of transformers' convert_vitpose_to_hf.py).

    Returns:
        The renamed state dict, config overrides (num_heads, layer_norm_eps) and the trained input (H, W).
    """
    backbone = {**HF_BACKBONE_DEFAULTS, **config.get("backbone_config", {})}
    if backbone["hidden_act"] != "gelu":
        raise UserError(f"{path}: activation {backbone['hidden_act']!r} is not ViTPose's gelu")
    simple = "head.deconv1.weight" not in sd
    stated = config.get("use_simple_decoder")
    if stated is not None and bool(stated) != simple:
        raise UserError(f"{path}: config.json says use_simple_decoder={stated} but the weights hold a "
                        f"{'simple' if simple else 'classic'} head")
    if simple and config.get("scale_factor", 4) != 4:
        raise UserError(f"{path}: simple head with scale_factor {config['scale_factor']}; ViTPose's is 4")
    out, unknown = rename_keys(sd, _HF_RENAMES)
    qkv = {}  # (block, kind) -> {query|key|value: tensor}
    for key in [k for k in out if ".attn.__" in k]:
        block, part, kind = re.match(r"backbone\.blocks\.(\d+)\.attn\.__(\w+)\.(weight|bias)$", key).groups()
        qkv.setdefault((int(block), kind), {})[part] = out.pop(key)
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"{path}: layer {block} lacks attention {sorted({'query', 'key', 'value'} - set(parts))}")
        out[f"backbone.blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in ("query", "key", "value")])
    if not backbone["qkv_bias"]:  # same function as a zero bias, which ViTPose's qkv always has
        for (block, kind), parts in list(qkv.items()):
            out[f"backbone.blocks.{block}.attn.qkv.bias"] = parts["query"].new_zeros(3 * parts["query"].shape[0])
    if unknown:
        raise UserError(f"{path}: unexpected HuggingFace VitPose keys {key_list(unknown)}")
    image = backbone["image_size"]
    image = (image, image) if isinstance(image, int) else tuple(image)
    overrides = {"num_heads": int(backbone["num_attention_heads"]), "layer_norm_eps": float(backbone["layer_norm_eps"])}
    log.info("HuggingFace VitPose weights: %s head, %d heads, LayerNorm eps %g", "simple" if simple else "classic",
             overrides["num_heads"], overrides["layer_norm_eps"])
    return out, overrides, (int(image[0]), int(image[1]))


_HF_RENAMES = [  # (HuggingFace pattern, official replacement), applied to the whole key
    (r"^backbone\.embeddings\.patch_embeddings\.projection\.", "backbone.patch_embed.proj."),
    (r"^backbone\.embeddings\.position_embeddings$", "backbone.pos_embed"),
    (r"^backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"backbone.blocks.\1.attn.__\2."),
    (r"^backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"backbone.blocks.\1.attn.proj."),
    (r"^backbone\.encoder\.layer\.(\d+)\.layernorm_before\.", r"backbone.blocks.\1.norm1."),
    (r"^backbone\.encoder\.layer\.(\d+)\.layernorm_after\.", r"backbone.blocks.\1.norm2."),
    (r"^backbone\.encoder\.layer\.(\d+)\.mlp\.(fc1|fc2|experts\.\d+)\.", r"backbone.blocks.\1.mlp.\2."),
    (r"^backbone\.layernorm\.", "backbone.last_norm."),
    (r"^head\.deconv1\.", "keypoint_head.deconv_layers.0."),
    (r"^head\.batchnorm1\.", "keypoint_head.deconv_layers.1."),
    (r"^head\.deconv2\.", "keypoint_head.deconv_layers.3."),
    (r"^head\.batchnorm2\.", "keypoint_head.deconv_layers.4."),
    (r"^head\.conv\.", "keypoint_head.final_layer."),
]


# ---------------------------------------------------------------------------------------------------------
# mmpose 1.x: mmcls / mmpretrain VisionTransformer + HeatmapHead

_MMPOSE1_RENAMES = [  # (mmpose 1.x pattern, official replacement); mmcv's FFN is layers.0.0 (Linear) -> layers.1
    (r"^backbone\.patch_embed\.projection\.", "backbone.patch_embed.proj."),
    (r"^backbone\.layers\.(\d+)\.ln([12])\.", r"backbone.blocks.\1.norm\2."),
    (r"^backbone\.layers\.(\d+)\.attn\.(qkv|proj)\.", r"backbone.blocks.\1.attn.\2."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"backbone.blocks.\1.mlp.fc1."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"backbone.blocks.\1.mlp.fc2."),
    (r"^backbone\.ln1\.", "backbone.last_norm."),
    (r"^head\.(deconv_layers|final_layer)\.", r"keypoint_head.\1."),
    (r"^backbone\.pos_embed$", "backbone.pos_embed"),
]


def from_mmpose1(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """mmpose 1.x ViTPose names -> official names, with the same function (see the module docstring).

    `backbone.pos_embed` holds a class slot first when the file also holds `backbone.cls_token` (mmcls 1.x
    builds both and never adds that slot to a patch); an mmpretrain file holds the patch positions alone.
    """
    # cls_token: unused with with_cls_token=False; the data preprocessor's mean/std are ViTPose's.
    out, unknown = rename_keys(sd, _MMPOSE1_RENAMES, drop=r"^(backbone\.cls_token$|data_preprocessor\.)")
    if unknown:
        raise UserError(f"{path}: mmpose 1.x keys that ViTPose does not have: {key_list(unknown)}; kdcache reads "
                        "mmpose's td-hm_ViTPose-* checkpoints (VisionTransformer + HeatmapHead)")
    if "backbone.pos_embed" not in out:
        raise UserError(f"{path}: mmpose 1.x ViTPose file without backbone.pos_embed")
    pos = out["backbone.pos_embed"]
    patches = pos[:, 1:] if "backbone.cls_token" in sd else pos
    out["backbone.pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), patches], dim=1)
    log.info("mmpose 1.x ViTPose file: renamed to the official layout (class position slot %s, not added to "
             "the patches)", "dropped" if "backbone.cls_token" in sd else "absent")
    return out
