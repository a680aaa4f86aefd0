"""kdcache checkpoints: what a run folder's `last.pt` / `best.pt` hold, and loading any model by path.

A kdcache checkpoint is a plain dict (tensors, numbers, strings) so that it loads with
`torch.load(..., weights_only=True)` and never executes code:

    {"format": "kdcache", "kind": "vitpose" | "student", "model_config": dict,
     "state_dict": {...}, "kdcache_version": str, "git_rev": str, "epoch": int, "step": int, ...}
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache import __version__
from kdcache.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "kdcache"


def git_revision() -> str:
    """The git revision of the kdcache source tree, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, str]:
    """What every run folder, checkpoint and cache shard records about the code that made it."""
    return {"kdcache_version": __version__, "git_rev": git_revision()}


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write under a temporary name and rename, so a kill never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_kind(model: nn.Module) -> str:
    from kdcache.student import PoseStudent

    return "student" if isinstance(model, PoseStudent) else "vitpose"


def checkpoint_dict(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A kdcache checkpoint of `model` (a ViTPose or a PoseStudent) plus training state in `extra`."""
    model = getattr(model, "module", model)  # DDP wrapper
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "kind": model_kind(model), "model_config": model.config.to_dict(),
            "state_dict": state, **provenance(), **extra}


def read_checkpoint(path: Path) -> Any:
    """`torch.load` with weights_only=True and one-line errors for missing or unsafe files."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt/.pth file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"refused to load {path}: not a plain-weights checkpoint ({first[:160]}); "
                        "kdcache loads checkpoints with weights_only=True and never runs code") from None


def load_model(path: Path, device: str = "cpu") -> nn.Module:
    """Any model by path, in eval mode: a kdcache student or teacher checkpoint, or an official ViTPose file."""
    from kdcache.student import StudentConfig, build_student
    from kdcache.teacher import load_teacher

    path = Path(path)
    if path.is_file():
        obj = read_checkpoint(path)
        if isinstance(obj, dict) and obj.get("format") == FORMAT and obj.get("kind") == "student":
            model = build_student(StudentConfig.from_dict(obj["model_config"]), load_pretrained=False)
            model.load_state_dict(obj["state_dict"])
            return model.to(device).eval()
    return load_teacher(path, device=device)


def model_input_hw(model: nn.Module) -> tuple[int, int]:
    """(H, W) of the crops a model takes, from its config."""
    return tuple(getattr(model, "module", model).config.input_hw)
