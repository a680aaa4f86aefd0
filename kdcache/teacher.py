"""Teachers: the families kdcache knows, loading any teacher file, and building one to train.

A teacher family is one module that exposes (ViTPose: `kdcache.vitpose_family`; TokenPose:
`kdcache.tokenpose_family`):

    KIND                     the `kind` its kdcache checkpoints record
    ARCHS                    presets by name (train-teacher --arch)
    build(arch, head, input_hw, num_keypoints)               a fresh model to train
    claims(obj) / from_release(obj, path, device, input_hw, expert)
                             recognise / load a release checkpoint already read (official layouts)
    claims_path(path) / from_path(path, device, input_hw, expert)
                             recognise / load a path it reads itself (e.g. a HuggingFace folder)
    weights_file(path)       the file holding the weights of such a path (its identity in a cache)
    from_kdcache(obj, path, device, input_hw, expert)        a kdcache checkpoint of its KIND

and its models carry `config` (with `input_hw`, `num_keypoints`, `to_dict()`), `kind`, and `codec` (the
targets it was trained with, `kdcache.codec`). Adding a family is its module, its entry in FAMILIES and its
tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kdcache import keypoints, student, tokenpose_family, vitpose_family, vitpose_formats
from kdcache.checkpoint import FORMAT, read_checkpoint
from kdcache.errors import UserError
from kdcache.keypoints import KeypointSet

# The teacher families by the kind their kdcache checkpoints record.
FAMILIES = {vitpose_family.KIND: vitpose_family, tokenpose_family.KIND: tokenpose_family}
# Every family's presets: train-teacher --arch.
ARCHS = {name: family for family in FAMILIES.values() for name in family.ARCHS}


def load_teacher(path: str | Path, device: str | torch.device = "cpu", input_hw: tuple[int, int] | None = None,
                 expert: str | int | None = None) -> nn.Module:
    """Load a teacher in eval mode from any file a family reads, or from a kdcache checkpoint.

    ViTPose: official release files (classic or simple head, S/B/L/H, multi-dataset and ViTPose++ files
    included), a bare state dict of the same keys, mmpose 1.x `td-hm_ViTPose-*` checkpoints, a HuggingFace
    VitPose folder (config.json + safetensors or .bin) or weight file, and kdcache checkpoints
    (`{"format": "kdcache", "kind": "vitpose", ...}`). TokenPose: the official code's files and mmpose's port's.
    A kdcache student checkpoint (any timm backbone train-student made) teaches too, at its own crop size.
    Pickled files are read with `torch.load(weights_only=True)`: a file that would run code is refused.

    Args:
        input_hw: crop (H, W) to run at; default: the checkpoint's own (ViTPose interpolates pos_embed,
            bicubic over the patch grid, the extra first slot kept, when it differs).
        expert: ViTPose++ expert to merge, by name (`vitpose_formats.VITPOSE_PLUS_DATASETS`) or index;
            default COCO.
    """
    path = Path(path)
    for family in FAMILIES.values():
        if family.claims_path(path):
            return family.from_path(path, device, input_hw, expert)
    if not path.is_file():
        raise UserError(f"teacher checkpoint {path} does not exist")
    return teacher_from_checkpoint(read_checkpoint(path), path, device, input_hw, expert)


def teacher_from_checkpoint(obj: object, path: Path, device: str | torch.device = "cpu",
                            input_hw: tuple[int, int] | None = None, expert: str | int | None = None) -> nn.Module:
    """`load_teacher` on an already loaded checkpoint object (`path` names it in messages)."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if obj.get("format") == FORMAT:
        if obj.get("kind") == student.KIND:
            return _student_as_teacher(obj, path, device, input_hw, expert)
        family = FAMILIES.get(obj.get("kind"))
        if family is None:
            raise UserError(f"{path} is a kdcache {obj.get('kind')!r} checkpoint, not a teacher "
                            f"({', '.join([*FAMILIES, student.KIND])})")
        return family.from_kdcache(obj, path, device, input_hw, expert)
    for family in FAMILIES.values():
        if family.claims(obj):
            return family.from_release(obj, path, device, input_hw, expert)
    keys = sorted(obj)[:6]
    raise UserError(f"{path} holds no teacher kdcache knows (top-level keys {keys}); pass a ViTPose release file, "
                    "a HuggingFace VitPose folder or a kdcache checkpoint")


def _student_as_teacher(obj: Mapping, path: Path, device: str | torch.device, input_hw: tuple[int, int] | None,
                        expert: str | int | None) -> nn.Module:
    """A kdcache student teaching: a model train-student made (a large timm backbone trained on your labels, or
    last round's student) teaches at its own crop size, with the codec and keypoint set it was trained with."""
    if expert is not None:
        raise UserError(f"--expert picks a ViTPose++ expert, but {path} is a kdcache student; drop --expert")
    model = student.student_from_checkpoint(obj, device)
    if input_hw is not None and tuple(input_hw) != tuple(model.config.input_hw):
        raise UserError(f"{path} is a kdcache student made for {model.config.input_hw[0]}x"
                        f"{model.config.input_hw[1]} crops and cannot run at {input_hw[0]}x{input_hw[1]}: use it "
                        "at its own size")
    return model


def teacher_weights_file(path: Path) -> Path:
    """The file whose bytes identify a teacher: the checkpoint itself, or the weight file of a folder."""
    path = Path(path)
    for family in FAMILIES.values():
        if family.claims_path(path):
            return family.weights_file(path)
    return path


def build_teacher(arch: str, head: str, input_hw: tuple[int, int], num_keypoints: int = 17) -> nn.Module:
    """A freshly initialised teacher of a family's preset `arch` predicting `num_keypoints` joints, for
    train-teacher (which passes its annotation file's keypoint count)."""
    if arch not in ARCHS:
        raise UserError(f"unknown teacher architecture {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch].build(arch, head, input_hw, num_keypoints)


def require_keypoint_set(teacher: nn.Module, keypoint_set: KeypointSet, path: Path, expert: str | int | None) -> None:
    """Refuse a teacher (e.g. the AIC or MPII expert of a ViTPose++ file) that predicts another keypoint set than
    the annotation file's: by the set the chosen expert was trained on, else by the count."""
    wanted = None if expert is None else vitpose_formats.expert_keypoint_set(expert)
    if wanted is not None and wanted != keypoint_set.name:
        raise UserError(f"--expert {expert!r} of {path} predicts {keypoints.keypoint_set(wanted).title}'s keypoints, "
                        f"the annotation file has {keypoint_set.title}'s: pass annotations of that set, or the "
                        f"expert of {keypoint_set.title}'s keypoints")
    count = teacher.config.num_keypoints
    if count != keypoint_set.num_keypoints:
        raise UserError(f"{path} (expert {expert!r}) predicts {count} keypoints, not {keypoint_set.title}'s "
                        f"{keypoint_set.num_keypoints}: choose the expert of those keypoints (COCO's is the default, "
                        "'coco')")
