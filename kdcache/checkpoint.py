"""kdcache checkpoints: what a run folder's `last.pt` / `best.pt` hold, and loading any model by path.

A kdcache checkpoint is a plain dict (tensors, numbers, strings) so that it loads with
`torch.load(..., weights_only=True)` and never executes code:

    {"format": "kdcache", "kind": "vitpose" | "student", "model_config": dict,
     "state_dict": {...}, "kdcache_version": str, "git_rev": str, "epoch": int, "step": int, ...}
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
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


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write under a temporary name and rename, so a kill or a full disk never leaves half a checkpoint.

    The checkpoint is serialised in memory and written with plain writes: torch's own file writer turns a
    full disk into an opaque RuntimeError, while this raises OSError (ENOSPC, EACCES, ...) naming `path`,
    and removes the temporary file.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(Path(path), buffer.getbuffer())


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """`path` gets `data` in full or stays as it was: written as `path.tmp`, fsynced, renamed.

    Raises:
        OSError: with `filename` set to `path`; the temporary file is gone.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def model_kind(model: nn.Module) -> str:
    from kdcache.student import PoseStudent

    return "student" if isinstance(model, PoseStudent) else "vitpose"


def checkpoint_dict(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A kdcache checkpoint of `model` (a ViTPose or a PoseStudent) plus training state in `extra`."""
    model = getattr(model, "module", model)  # DDP wrapper
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "kind": model_kind(model), "model_config": model.config.to_dict(),
            "state_dict": state, **provenance(), **extra}


def safe_numpy_globals() -> list:
    """Data-only numpy globals for `torch.serialization.safe_globals`.

    mmcv-saved release files pickle numpy scalars in `meta` (the best validation score); without these
    a weights_only load refuses them. Both numpy 1.x (`numpy.core`) and 2.x (`numpy._core`) names.
    """
    core = getattr(np, "_core", None) or np.core
    out: list = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(core.multiarray.scalar, f"{mod}.scalar"), (core.multiarray._reconstruct, f"{mod}._reconstruct")]
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_):
        out.append(type(np.dtype(t)))
    return out


def read_checkpoint(path: Path) -> Any:
    """`torch.load` with weights_only=True (plus numpy scalars) and one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt/.pth file")
    try:
        with torch.serialization.safe_globals(safe_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # foreign files raise UnpicklingError, RuntimeError, EOFError, ... alike
        if isinstance(e, pickle.UnpicklingError) and re.search(r"Unsupported (global|class)", str(e)):
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise UserError(f"refused to load {path}: it holds Python objects{what} that could run code on load "
                            "(torch.load weights_only=True); re-save just the state dict") from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(e).__name__} while reading it)") from None


def load_model(path: Path, device: str = "cpu", expert: str | int | None = None) -> nn.Module:
    """Any model by path, in eval mode: a kdcache student or teacher checkpoint, or an official ViTPose file."""
    from kdcache.student import StudentConfig, build_student
    from kdcache.teacher import load_teacher, teacher_from_checkpoint
    from kdcache.teacher_formats import is_huggingface_path

    path = Path(path)
    if not path.is_file() or is_huggingface_path(path):
        return load_teacher(path, device=device, expert=expert)  # HuggingFace; missing paths: it says why
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT and obj.get("kind") == "student":
        if expert is not None:
            raise UserError(f"--expert picks a ViTPose++ expert, but {path} is a kdcache student; drop --expert")
        model = build_student(StudentConfig.from_dict(obj["model_config"]), load_pretrained=False)
        model.load_state_dict(obj["state_dict"])
        return model.to(device).eval()
    return teacher_from_checkpoint(obj, path, device, expert=expert)


def model_input_hw(model: nn.Module) -> tuple[int, int]:
    """(H, W) of the crops a model takes, from its config."""
    return tuple(getattr(model, "module", model).config.input_hw)
