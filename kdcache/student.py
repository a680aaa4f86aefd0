"""Students: any timm backbone (features_only, deepest map) plus a heatmap head upsampling to stride 4.

The backbone is a plain timm name, never a registry of ours: `StudentConfig("mobilenetv3_large_100")`.
Its deepest feature map (stride 32, or 16 for plain ViTs) is brought to stride 4 by ×2 upsampling
blocks, then a 1×1 conv gives one heatmap per keypoint. Attention backbones (EfficientFormer v1 and V2,
ViT) are built for `input_hw` and only run at that size. ImageNet weights come from a file or, with
pretrained="timm", through timm's own cache (downloaded there when missing, as timm does); weights learnt at
224×224 have their relative-position attention tables fitted to `input_hw`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import timm
import torch
from timm.models.efficientformer import Attention as _FlatAttention
from torch import nn

from kdcache.errors import UserError
from kdcache.keypoints import NUM_KEYPOINTS

log = logging.getLogger(__name__)

HEADS = ("deconv", "light")
HEATMAP_STRIDE = 4
# The students the issue names, each tested to build at 256x192, train and evaluate; any other timm name works too.
NAMED_STUDENTS = ("mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv4_conv_small",
                  "mobilenetv4_conv_medium", "efficientformer_l1", "efficientformer_l3", "efficientformerv2_s0",
                  "efficientformerv2_s1", "efficientformerv2_s2")


@dataclass(frozen=True)
class StudentConfig:
    """Everything needed to rebuild a student (stored as `model_config` in checkpoints)."""

    backbone: str  # timm model name, e.g. "mobilenetv3_large_100" (a ".tag" suffix picks pretrained weights)
    head: str = "deconv"  # "deconv": ConvT k4 s2 + BN + ReLU blocks (SimpleBaseline); "light": bilinear + dw-sep conv
    input_hw: tuple[int, int] = (256, 192)  # crop size (H, W) in pixels; heatmaps are input_hw / 4
    num_keypoints: int = NUM_KEYPOINTS  # heatmap channels
    head_channels: int = 128  # width of every upsampling block of the head
    pretrained: str = ""  # "": random init; "timm": ImageNet weights via timm's cache (downloaded if missing); or a file

    def to_dict(self) -> dict:
        """Plain types only (lists for tuples), so it survives JSON and `torch.load(weights_only=True)`."""
        d = asdict(self)
        d["input_hw"] = list(self.input_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StudentConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown student config keys {unknown}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "input_hw" in d:
            d["input_hw"] = tuple(int(v) for v in d["input_hw"])
        return cls(**d)


class PoseStudent(nn.Module):
    """timm backbone + heatmap head.

    forward: x [N, 3, H, W] float32 (RGB, ImageNet-normalised) -> heatmaps [N, K, H/4, W/4].
    """

    def __init__(self, config: StudentConfig, backbone: nn.Module, in_channels: int, num_blocks: int):
        super().__init__()
        self.config = config
        self.backbone = backbone
        make_head = _deconv_head if config.head == "deconv" else _light_head
        self.head = make_head(in_channels, config.head_channels, num_blocks, config.num_keypoints)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)[-1]  # deepest map: [N, C, H/stride, W/stride]
        return self.head(features)


def build_student(cfg: StudentConfig, load_pretrained: bool = True) -> PoseStudent:
    """Build the student described by `cfg`.

    Args:
        cfg: the student; `cfg.pretrained` says where backbone weights come from.
        load_pretrained: False skips `cfg.pretrained` (random init, config kept as is): for rebuilding a
            trained student from a checkpoint, whose state dict replaces every weight anyway, on a machine
            that may not have the ImageNet weights.
    """
    if cfg.head not in HEADS:
        raise UserError(f"unknown student head {cfg.head!r}; choose one of {list(HEADS)}")
    _check_known_model(cfg.backbone)
    pretrained = cfg.pretrained if load_pretrained else ""
    if pretrained == "timm":
        backbone = _create_backbone(cfg, pretrained_sd=_read_weights(_timm_weights_file(cfg.backbone)))
        log.info("loaded ImageNet weights for %s from timm's cache", cfg.backbone)
    else:
        backbone = _create_backbone(cfg, pretrained_sd=None)
    if pretrained not in ("", "timm"):
        sd = _read_weights(Path(pretrained))
        # A kdcache student (checkpoint "state_dict" or bare) keeps its backbone under "backbone.".
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")} or sd
        if set(backbone_sd) == set(backbone.state_dict()):
            backbone.load_state_dict(backbone_sd)
        else:
            backbone = _create_backbone(cfg, pretrained_sd=sd)  # a timm (ImageNet classifier) state dict
        log.info("loaded backbone weights for %s from %s", cfg.backbone, cfg.pretrained)

    stride = backbone.feature_info.reduction()[-1]
    num_blocks = round(math.log2(stride / HEATMAP_STRIDE)) if stride > HEATMAP_STRIDE else 0
    if stride != HEATMAP_STRIDE * 2**num_blocks or num_blocks < 1:
        raise UserError(
            f"backbone {cfg.backbone} ends at stride {stride}; students need a power-of-two stride >= 8 "
            "(most timm CNNs: 32); pick another backbone"
        )
    if cfg.input_hw[0] % stride or cfg.input_hw[1] % stride:
        raise UserError(
            f"input_hw {tuple(cfg.input_hw)} is not divisible by the stride {stride} of {cfg.backbone}; "
            f"use a multiple of {stride} such as (256, 192)"
        )
    channels = _probe(backbone, cfg, stride)
    return PoseStudent(cfg, backbone, channels, num_blocks)


def _probe(backbone: nn.Module, cfg: StudentConfig, stride: int) -> int:
    """One batch-1 forward at input_hw: fail at build time, not mid-training, on backbones whose layers are
    tied to another input size (e.g. fixed position embeddings), and check the map is input/stride.

    Returns the channels of the deepest map.
    """
    was_training = backbone.training
    backbone.eval()  # a train-mode probe would move the BatchNorm running statistics
    try:
        with torch.no_grad():
            features = backbone(torch.zeros(1, 3, *cfg.input_hw))[-1]
    except RuntimeError as e:
        raise UserError(
            f"backbone {cfg.backbone} fails on a {cfg.input_hw[0]}x{cfg.input_hw[1]} input "
            f"({str(e).splitlines()[0][:150]}); it may be tied to its ImageNet input size: pick another backbone"
        ) from None
    finally:
        backbone.train(was_training)
    expected = (cfg.input_hw[0] // stride, cfg.input_hw[1] // stride)
    if features.ndim != 4 or tuple(features.shape[-2:]) != expected:
        raise UserError(
            f"backbone {cfg.backbone} gives a {tuple(features.shape)} feature map for a {cfg.input_hw} input, "
            f"not [1, C, {expected[0]}, {expected[1]}]; pick another backbone"
        )
    return features.shape[1]


# --- heads ------------------------------------------------------------------------------------------


def _deconv_head(in_channels: int, width: int, num_blocks: int, num_keypoints: int) -> nn.Sequential:
    """SimpleBaseline / ViTPose-classic head: (ConvT k4 s2 p1 + BN + ReLU) × num_blocks, then 1×1 conv."""
    layers: list[nn.Module] = []
    for i in range(num_blocks):
        deconv = nn.ConvTranspose2d(in_channels if i == 0 else width, width, 4, stride=2, padding=1, bias=False)
        nn.init.normal_(deconv.weight, std=0.001)  # mmpose's init for this head
        layers += [deconv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    layers.append(_final_conv(width, num_keypoints))
    return nn.Sequential(*layers)


def _light_head(in_channels: int, width: int, num_blocks: int, num_keypoints: int) -> nn.Sequential:
    """1×1 reduction to `width` at low resolution (cheap), then (bilinear ×2 + depthwise 3×3 + pointwise 1×1)
    × num_blocks, then 1×1 conv."""
    layers: list[nn.Module] = [_conv_bn_relu(in_channels, width, 1)]
    for _ in range(num_blocks):
        layers += [
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_bn_relu(width, width, 3, groups=width),
            _conv_bn_relu(width, width, 1),
        ]
    layers.append(_final_conv(width, num_keypoints))
    return nn.Sequential(*layers)


def _conv_bn_relu(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _final_conv(width: int, num_keypoints: int) -> nn.Conv2d:
    conv = nn.Conv2d(width, num_keypoints, 1)
    nn.init.normal_(conv.weight, std=0.001)
    nn.init.zeros_(conv.bias)
    return conv


# --- backbone ---------------------------------------------------------------------------------------


def _check_known_model(name: str) -> None:
    base = name.split(".", 1)[0]
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('*mobilenet*')"
    raise UserError(f"unknown timm backbone {name!r}; {hint}")


def _create_backbone(cfg: StudentConfig, pretrained_sd: dict | None) -> nn.Module:
    """timm features_only model returning only the deepest map; `pretrained_sd` in timm's classifier layout."""
    kwargs: dict = dict(features_only=True, out_indices=(-1,))
    if pretrained_sd is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=pretrained_sd))
    # Attention models (EfficientFormerV2, ViT, ...) size their position tables from img_size; CNNs reject it.
    attempts = [dict(kwargs, img_size=tuple(cfg.input_hw)), kwargs]
    for i, attempt in enumerate(attempts):
        try:
            if pretrained_sd is not None:
                attempt["pretrained_cfg_overlay"] = dict(state_dict=_fit_attention_biases(pretrained_sd, cfg, attempt))
            with _missing_keys_watch() as missing:
                model = timm.create_model(cfg.backbone, **attempt)
            _fit_flat_attention(model, cfg.input_hw)
            classifiers = tuple(c + "." for c in _classifier_names(cfg.backbone))
            missing = [k for k in missing if not k.startswith(classifiers)]
            if missing:
                raise UserError(
                    f"weights {cfg.pretrained} do not fit {cfg.backbone}: {len(missing)} tensors missing, "
                    f"e.g. {missing[0]}; wrong weights file?"
                )
            return model
        except TypeError as e:
            if i == 0 and "img_size" in str(e):
                continue
            raise UserError(f"timm cannot build {cfg.backbone} as a feature extractor ({e}); pick another backbone")
        except (RuntimeError, ValueError, AssertionError, NotImplementedError, KeyError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if pretrained_sd is not None:
                raise UserError(f"cannot load {cfg.pretrained} into {cfg.backbone} ({reason}); wrong weights file?")
            raise UserError(f"timm cannot build features_only for {cfg.backbone} ({reason}); pick another backbone")
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


def _fit_attention_biases(sd: dict, cfg: StudentConfig, create_kwargs: dict) -> dict:
    """EfficientFormerV2 (built for img_size): fit the 7×7 attention biases of a 224×224 state dict to the
    grids of the model built for this input (see `_fit_distance_table`)."""
    keys = [k for k, v in sd.items() if k.endswith("attention_biases") and v.ndim == 2]
    if not keys:
        return sd
    plain_kwargs = {k: v for k, v in create_kwargs.items() if k not in ("features_only", "out_indices", "pretrained",
                                                                         "pretrained_cfg_overlay")}
    plain = timm.create_model(cfg.backbone, num_classes=0, **plain_kwargs)
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


def _timm_weights_file(name: str) -> Path:
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


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (never unpickles code: weights_only)."""
    if not path.is_file():
        raise UserError(f"backbone weights file {path} not found; pass an existing file or pretrained=''")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and format errors have many types; all mean the same to the user
        raise UserError(f"cannot read weights from {path} ({type(e).__name__}); expected a state dict file") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the state dict
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return _strip_prefix(sd, "module.")  # saved from DistributedDataParallel


def _strip_prefix(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd
