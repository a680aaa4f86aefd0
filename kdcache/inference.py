"""Running a pose model on crops: the input normalisation, and the one forward (bf16 on GPU, optional
flip averaging) that the dump, evaluation and online distillation share."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kdcache.codec import Codec
from kdcache.keypoints import KeypointSet

# ImageNet normalisation that ViTPose and timm students are trained with, RGB order, 0-255 scale.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def to_input_tensor(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Crops -> model input, normalised with ImageNet mean/std on the 0-255 scale.

    Equal (to float rounding) to mmpose's ToTensor (/255) + NormalizeTensor. A torch input stays on
    its device, so moving uint8 to the GPU first and normalising there is cheap.

    Args:
        crops: uint8 [N, H, W, 3] RGB, numpy or torch.

    Returns:
        float32 [N, 3, H, W].
    """
    crops = _as_tensor(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected crops [N, H, W, 3], got {tuple(crops.shape)}")
    x = crops.permute(0, 3, 1, 2).to(torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _as_tensor(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(crops, np.ndarray):
        if not crops.flags.writeable:
            crops = crops.copy()
        crops = torch.from_numpy(np.ascontiguousarray(crops))
    return crops


def predict_heatmaps(model: nn.Module, crops: np.ndarray | torch.Tensor, codec: Codec,
                     keypoint_set: KeypointSet, flip_test: bool = False) -> torch.Tensor:
    """Heatmaps of uint8 crops [N, H, W, 3] RGB (numpy or torch, any device): `input_heatmaps` of their
    normalised input on the model's device. The uint8 crops travel to the device and are normalised there: a
    quarter of float32's bytes, and no CPU time in the process that feeds the GPU (a ViTPose-B dump on an H200 went
    from 614 to about 1,000 views/s: README, On a GPU)."""
    device = next(model.parameters()).device
    return input_heatmaps(model, to_input_tensor(_as_tensor(crops).to(device)), codec, keypoint_set, flip_test)


@torch.no_grad()
def input_heatmaps(model: nn.Module, x: torch.Tensor, codec: Codec, keypoint_set: KeypointSet,
                   flip_test: bool = False) -> torch.Tensor:
    """Heatmaps of normalised crops x [N, 3, H, W] on the model's device: bf16 autocast on a GPU, fp32 on the CPU.

    With `flip_test`, the mean of the model on the crop and on its mirror, mirrored back by `codec` with the
    pairs of `keypoint_set` swapped (ViTPose's flip test; the dump's --teacher-flip).

    Returns:
        float32 [N, K, h, w].
    """
    device = x.device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        heat = model(x).float()
        if flip_test:
            mirrored = model(torch.flip(x, dims=[3])).float()
            heat = (heat + codec.flip(mirrored, keypoint_set)) * 0.5
    return heat
