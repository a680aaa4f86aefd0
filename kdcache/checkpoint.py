"""Checkpoint files: what a run folder's `last.pt` / `best.pt` hold, and reading and writing weight files.

A kdcache checkpoint is a plain dict (tensors, numbers, strings) so that it loads with
`torch.load(..., weights_only=True)` and never executes code:

    {"format": "kdcache", "kind": "vitpose" | "student" | ..., "model_config": dict,
     "state_dict": {...}, "kdcache_version": str, "git_rev": str, "epoch": int, "step": int, ...}

File I/O only: which model a file holds, and building it, is `kdcache.models` (and the teacher families).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pickle
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

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


class ModelConfig:
    """Mixin for the frozen dataclass a model is rebuilt from, stored as a checkpoint's `model_config`: plain
    values out (lists for tuples, so it survives JSON and `torch.load(weights_only=True)`), checked values in."""

    title: ClassVar[str] = "model"  # what messages call the model

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_hw"] = list(self.input_hw)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown {cls.title} config keys {unknown} (was it written by a newer kdcache?); "
                            f"expected a subset of {sorted(known)}")
        d = dict(d)
        if "input_hw" in d:
            d["input_hw"] = tuple(int(v) for v in d["input_hw"])
        return cls(**d)


def checkpoint_dict(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A kdcache checkpoint of `model` plus training state in `extra`.

    Any kdcache model: its `kind` ("vitpose", "student", ...) says which builder `kdcache.models` calls with
    its `config.to_dict()` to make it again.
    """
    model = getattr(model, "module", model)  # DDP wrapper
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "kind": model.kind, "model_config": model.config.to_dict(),
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


# Keys that wrap a state dict in training checkpoints: {'state_dict': ...}, {'model': ...},
# {'model': {'state_dict': ...}}, ... (mmcv's checkpoint loader unwraps the same three).
_WRAPPERS = ("state_dict", "model", "module")


def key_list(keys: list[str]) -> str:
    """The first few of `keys` and how many there are, for a one-line message."""
    return ", ".join(keys[:4]) + (f" ... ({len(keys)} in all)" if len(keys) > 4 else f" ({len(keys)})")


def key_mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps weights `sd` from loading into a model whose state dict is `own`: missing keys (BN step
    counters excepted: converted files drop them) and unexpected ones; None when the key sets fit."""
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    parts = ([f"missing keys {key_list(missing)}"] if missing else []) + \
            ([f"unexpected keys {key_list(unexpected)}"] if unexpected else [])
    return "; ".join(parts) or None


def shape_mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> str | None:
    """The keys whose shapes differ between `sd` and `own`, or None."""
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]
    return f"shape mismatch {key_list(wrong)}" if wrong else None


def rename_keys(sd: Mapping[str, torch.Tensor], renames: list[tuple[str, str]], drop: str | None = None
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Another layout's weights under our names: each key under the first (regex, replacement) of `renames` that
    matches it (`re.sub` replacements), the keys `drop` matches left out; also the keys nothing matched."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if drop is not None and re.match(drop, key):
            continue
        new = next((re.sub(pattern, replacement, key) for pattern, replacement in renames if re.match(pattern, key)),
                   None)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    return out, unknown


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint object (wrapper keys and a `module.` prefix removed).

    Raises:
        UserError: no dict of tensors is found.
    """
    sd = obj
    while isinstance(sd, Mapping) and (key := next((k for k in _WRAPPERS if isinstance(sd.get(k), Mapping)), None)):
        sd = sd[key]  # any nesting of the wrappers, outermost first
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = sorted(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise UserError(f"{path} holds no state dict of tensors (top level: {keys}); pass a weights file")
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: safetensors, or a PyTorch checkpoint (weights_only) unwrapped."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return unwrap_state_dict(read_checkpoint(path), path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    from safetensors import SafetensorError  # optional until a .safetensors file is read
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
