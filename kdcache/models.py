"""Any model by path (a kdcache student or teacher checkpoint, or a teacher release file), and what every
kdcache model offers the stages that take "any checkpoint" (eval, bench, export)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdcache.checkpoint import FORMAT, read_checkpoint
from kdcache.errors import UserError
from kdcache.student import KIND as STUDENT, StudentConfig, build_student
from kdcache.teacher import FAMILIES, load_teacher, teacher_from_checkpoint


def load_model(path: Path, device: str | torch.device = "cpu", expert: str | int | None = None) -> nn.Module:
    """Any model by path, in eval mode: a kdcache student or teacher checkpoint, or any teacher file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model checkpoint {path} does not exist; pass a kdcache checkpoint, a teacher release file "
                        "or a HuggingFace VitPose folder")
    if not path.is_file() or any(family.claims_path(path) for family in FAMILIES.values()):
        return load_teacher(path, device=device, expert=expert)  # e.g. a HuggingFace folder
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT and obj.get("kind") == STUDENT:
        if expert is not None:
            raise UserError(f"--expert picks a ViTPose++ expert, but {path} is a kdcache student; drop --expert")
        model = build_student(StudentConfig.from_dict(obj["model_config"]), load_pretrained=False)
        model.load_state_dict(obj["state_dict"])
        return model.to(device).eval()
    return teacher_from_checkpoint(obj, path, device, expert=expert)


def model_input_hw(model: nn.Module) -> tuple[int, int]:
    """(H, W) of the crops a model takes, from its config."""
    return tuple(getattr(model, "module", model).config.input_hw)
