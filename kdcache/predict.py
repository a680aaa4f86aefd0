"""Keypoints of person boxes: un-augmented crops (the codec's affine), the model (optionally flip-averaged),
decoding (the codec's), and the way back to image pixels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdcache.boxes import PersonBox
from kdcache.codec import Codec
from kdcache.images import ImageMemo
from kdcache.inference import predict_heatmaps
from kdcache.keypoints import KeypointSet
from kdcache.transforms import bbox_to_center_scale, crop_to_image, warp_crop


@dataclass(frozen=True)
class PredictConfig:
    """How person boxes are run through a model."""

    flip_test: bool = False     # average with the mirrored crop (ViTPose's flip test)
    batch_size: int = 64        # crops per forward
    workers: int = 0            # DataLoader worker processes (0 = in this process: validation during training)
    progress: bool = False      # a progress bar over the batches


class BoxCrops(Dataset):
    """Un-augmented crops of person boxes (the codec's affine), with the affine that made each."""

    def __init__(self, boxes: list[PersonBox], images_dir: Path, codec: Codec):
        self.boxes, self.codec = boxes, codec
        self._images = ImageMemo(images_dir)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        box = self.boxes[index]
        center, scale_wh = bbox_to_center_scale(box.bbox_xywh)
        affine = self.codec.crop_affine(center, scale_wh, 0.0)
        crop = warp_crop(self._images(box.file_name, box.image_wh), affine, self.codec.input_hw)
        return {"crop": crop, "affine": affine, "area": np.float64(scale_wh[0] * scale_wh[1])}


def heatmaps_to_image(heatmaps: np.ndarray, affines: np.ndarray, codec: Codec) -> np.ndarray:
    """Decode heatmaps [N, K, h, w] of crops made by `affines` [N, 2, 3] -> [N, K, 3] (x, y image px, score)."""
    crop_xy, scores = codec.decode(heatmaps)
    image_xy = np.stack([crop_to_image(xy, a) for xy, a in zip(crop_xy, affines)])
    return np.concatenate([image_xy, scores[..., None]], axis=-1).astype(np.float32)


def predict_keypoints(model: nn.Module, boxes: list[PersonBox], images_dir: Path, codec: Codec,
                      keypoint_set: KeypointSet, cfg: PredictConfig) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints of each box in image pixels.

    Returns:
        keypoints: [N, K, 3] float32 (x, y, score); areas: [N] float64, the crop region's area in image
        pixels (the box made 0.75 w/h and padded 1.25: mmpose's `np.prod(scale * 200)`), for OKS-NMS.
    """
    loader = DataLoader(BoxCrops(boxes, images_dir, codec), batch_size=cfg.batch_size, num_workers=cfg.workers)
    keypoints, areas = [], []
    for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not cfg.progress):
        heat = predict_heatmaps(model, batch["crop"], codec, keypoint_set, cfg.flip_test).cpu().numpy()
        keypoints.append(heatmaps_to_image(heat, batch["affine"].numpy(), codec))
        areas.append(batch["area"].numpy())
    if not keypoints:
        return np.zeros((0, keypoint_set.num_keypoints, 3), np.float32), np.zeros((0,), np.float64)
    return np.concatenate(keypoints), np.concatenate(areas)
