"""timm backbones for students: built as feature extractors for the crop size, ImageNet weights found as timm
finds them, and attention tables learnt at 224x224 fitted to the crop's token grid.

timm is imported here only: `kdcache.student` imports this module when it builds a student, so configs and
the command line load without it.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
from pathlib import Path

import timm
import torch
from timm.models.efficientformer import Attention as _FlatAttention
from torch import nn

from kdcache.errors import UserError

log = logging.getLogger(__name__)


def check_known_model(name: str) -> None:
    base = name.split(".", 1)[0]
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('*mobilenet*')"
    raise UserError(f"unknown timm backbone {name!r}; {hint}")


def create_backbone(name: str, input_hw: tuple[int, int], pretrained_sd: dict | None, weights: str = "") -> nn.Module:
    """timm features_only model `name` built for `input_hw`, returning only the deepest map.

    Args:
        pretrained_sd: weights in timm's classifier layout (None: random init).
        weights: where `pretrained_sd` came from, for messages.
    """
    kwargs: dict = dict(features_only=True, out_indices=(-1,))
    if pretrained_sd is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=pretrained_sd))
    # Attention models (EfficientFormerV2, ViT, ...) size their position tables from img_size; CNNs reject it.
    attempts = [dict(kwargs, img_size=tuple(input_hw)), kwargs]
    for i, attempt in enumerate(attempts):
        try:
            if pretrained_sd is not None:
                attempt["pretrained_cfg_overlay"] = dict(state_dict=_fit_attention_biases(pretrained_sd, name, attempt))
            with _missing_keys_watch() as missing:
                model = timm.create_model(name, **attempt)
            _fit_flat_attention(model, input_hw)
            classifiers = tuple(c + "." for c in _classifier_names(name))
            missing = [k for k in missing if not k.startswith(classifiers)]
            if missing:
                raise UserError(
                    f"weights {weights} do not fit {name}: {len(missing)} tensors missing, "
                    f"e.g. {missing[0]}; wrong weights file?"
                )
            return model
        except TypeError as e:
            if i == 0 and "img_size" in str(e):
                continue
            raise UserError(f"timm cannot build {name} as a feature extractor ({e}); pick another backbone")
        except (RuntimeError, ValueError, AssertionError, NotImplementedError, KeyError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if pretrained_sd is not None:
                raise UserError(f"cannot load {weights} into {name} ({reason}); wrong weights file?")
            raise UserError(f"timm cannot build features_only for {name} ({reason}); pick another backbone")
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _missing_keys_watch():
    """Collect timm's "Missing keys" report: its loader is non-strict when the classifier is dropped, so a
    wrong weights file would otherwise load silently as random init."""
    missing: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Missing keys ("):
                missing.extend(message[len("Missing keys ("):].split(")", 1)[0].split(", "))

    timm_log = logging.getLogger("timm.models._builder")
    handler, old_level = _Handler(logging.INFO), timm_log.level
    timm_log.addHandler(handler)
    timm_log.setLevel(logging.INFO)
    try:
        yield missing
    finally:
        timm_log.removeHandler(handler)
        timm_log.setLevel(old_level)


def _classifier_names(name: str) -> tuple[str, ...]:
    """Top-level classifier modules, which the features model keeps unloaded (timm drops them from the file)."""
    classifier = getattr(timm.models.get_pretrained_cfg(name), "classifier", None) or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _fit_attention_biases(sd: dict, name: str, create_kwargs: dict) -> dict:
    """EfficientFormerV2 (built for img_size): fit the 7×7 attention biases of a 224×224 state dict to the
    grids of the model built for this input (see `_fit_distance_table`)."""
    keys = [k for k, v in sd.items() if k.endswith("attention_biases") and v.ndim == 2]
    if not keys:
        return sd
    plain_kwargs = {k: v for k, v in create_kwargs.items() if k not in ("features_only", "out_indices", "pretrained",
                                                                         "pretrained_cfg_overlay")}
    plain = timm.create_model(name, num_classes=0, **plain_kwargs)
    target = plain.state_dict()
    sd = dict(sd)
    for key in keys:
        if key not in target or target[key].shape == sd[key].shape:
            continue
        resolution = getattr(plain.get_submodule(key.rsplit(".", 1)[0]), "resolution", None)
        heads, n_old = sd[key].shape
        side = math.isqrt(n_old)
        if resolution is None or side * side != n_old or target[key].shape != (heads, resolution[0] * resolution[1]):
            continue  # leave it to timm's loader, which reports the mismatch
        sd[key] = _fit_distance_table(sd[key], tuple(resolution))
        log.info("attention biases %s: %dx%d grid fitted to %dx%d", key, side, side, *resolution)
    return sd


def _fit_flat_attention(model: nn.Module, input_hw: tuple[int, int]) -> None:
    """EfficientFormer v1 (L1, L3, L7): re-size the last stage's attention to this input's stride-32 grid,
    in place, keeping the weights already loaded.

    timm builds that attention for a 7×7 grid (224 input) whatever `img_size` says: `attention_biases`
    [heads, 49] is a table over (|dy|, |dx|) token offsets, gathered through the buffer
    `attention_bias_idxs` [49, 49] (query token, key token) -> |dy| * 7 + |dx|. Both are rebuilt for the
    (h, w) grid: biases [heads, h*w] from `_fit_distance_table`, index [h*w, h*w] -> |dy| * w + |dx|.
    """
    h, w = -(-input_hw[0] // 32), -(-input_hw[1] // 32)  # each stride-2 conv (k3, p1) rounds up
    for module in model.modules():
        if not isinstance(module, _FlatAttention):
            continue
        n_old = module.attention_biases.shape[1]
        if n_old == h * w and module.attention_bias_idxs.shape == (h * w, h * w):
            continue
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # [2, h*w]
        offsets = (yx[:, :, None] - yx[:, None, :]).abs()  # [2, h*w, h*w]: |dy|, |dx| per (query, key)
        with torch.no_grad():
            table = _fit_distance_table(module.attention_biases.detach(), (h, w))
        module.attention_biases = nn.Parameter(table.to(module.attention_biases))
        module.attention_bias_idxs = (offsets[0] * w + offsets[1]).to(module.attention_bias_idxs.device)
        module.attention_bias_cache = {}  # eval-mode cache of the gathered [heads, N, N] biases
        log.debug("EfficientFormer attention: %d-token bias table fitted to a %dx%d grid", n_old, h, w)


def _fit_distance_table(table: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Crop / edge-pad a relative-position bias table learnt on a square grid to an (h, w) grid.

    table: [heads, side*side], entry |dy| * side + |dx| -> [heads, h*w], entry |dy| * w + |dx|.

    Cropping rather than interpolating (as LeViT / TinyViT do): a token is 32 pixels at any input size, so an
    offset of d tokens means the same image distance at 224 and at 256×192; resampling the 7×7 table to 8×6
    would stretch rows and squeeze columns by different factors, and at 4×3 or 2×2 it would give
    neighbours the bias learnt for tokens six apart. Offsets beyond the learnt ones repeat the largest.
    """
    heads, n_old = table.shape
    side = math.isqrt(n_old)
    h, w = hw
    grid = table.reshape(heads, side, side)[:, :h, :w]
    grid = torch.cat([grid, grid[:, -1:].expand(heads, h - grid.shape[1], grid.shape[2])], dim=1)
    grid = torch.cat([grid, grid[:, :, -1:].expand(heads, h, w - grid.shape[2])], dim=2)
    return grid.reshape(heads, h * w).contiguous()


def timm_weights_file(name: str) -> Path:
    """The ImageNet weights of a timm model, found as `timm.create_model(name, pretrained=True)` finds them:
    in the Hugging Face hub cache (or torch hub's checkpoints), downloaded into that cache when missing."""
    try:
        pcfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        pcfg = None
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url):
        raise UserError(f"timm has no pretrained weights for {name}; use --pretrained '' or a weights file")
    hub_names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    cached = _cached_weights(pcfg, hub_names)
    if cached is not None:
        return cached
    where = pcfg.hf_hub_id or pcfg.url
    log.info("downloading ImageNet weights for %s from %s into timm's cache", name, where)
    try:
        if pcfg.hf_hub_id:
            from huggingface_hub import hf_hub_download

            repo_id, _, revision = pcfg.hf_hub_id.partition("@")
            for i, filename in enumerate(hub_names):
                try:
                    return Path(hf_hub_download(repo_id, filename, revision=revision or None))
                except Exception as e:  # this name is not in the repo: try the next, as timm does
                    if i == len(hub_names) - 1 or "EntryNotFound" not in type(e).__name__:
                        raise
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(pcfg.url)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(pcfg.url, str(target), progress=False)
        return target
    except Exception as e:  # no network, proxy, HF_HUB_OFFLINE=1, ...: all mean the same to the user
        raise UserError(f"could not download ImageNet weights for {name} from {where} ({type(e).__name__}); "
                        "connect this machine to the internet once (the weights are then cached), or pass "
                        "--pretrained FILE") from None


def _cached_weights(pcfg, hub_names: list[str]) -> Path | None:
    """The weights file already in the HF hub cache or torch hub's checkpoints, or None."""
    if pcfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        repo_id, _, revision = pcfg.hf_hub_id.partition("@")
        with _hf_offline():
            for filename in hub_names:
                try:
                    return Path(hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=True))
                except Exception:  # not in the cache: try the next name
                    continue
    if pcfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(pcfg.url)
        if cached.is_file():
            return cached
    return None


@contextlib.contextmanager
def _hf_offline():
    """HF_HUB_OFFLINE=1 for the duration: `local_files_only` already forbids downloads; this is belt and braces."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
