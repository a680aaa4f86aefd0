"""Any model by path (a kdcache student or teacher checkpoint, or a teacher release file), and what every
kdcache model offers the stages that take "any checkpoint" (eval, bench, export)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdcache.errors import UserError
from kdcache.teacher import load_teacher


def load_model(path: Path, device: str | torch.device = "cpu", expert: str | int | None = None) -> nn.Module:
    """Any model by path, in eval mode: a kdcache student or teacher checkpoint, or any teacher file (every model
    `load_teacher` takes: kdcache students teach too)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model checkpoint {path} does not exist; pass a kdcache checkpoint, a teacher release file "
                        "or a HuggingFace VitPose folder")
    return load_teacher(path, device=device, expert=expert)


def model_input_hw(model: nn.Module) -> tuple[int, int]:
    """(H, W) of the crops a model takes, from its config."""
    return tuple(getattr(model, "module", model).config.input_hw)
