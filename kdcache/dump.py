"""Stage 1: the teacher over K augmented views of every person instance -> HDF5 shards + manifest.

The dump order is fixed: instances sorted by (image_id, ann_id), K views each; shard i holds rows
[i * shard_size, (i + 1) * shard_size) of it. A rerun with the same settings skips the shards the
manifest lists as complete and rewrites any other, so an interrupted dump finishes with exactly the
views of an uninterrupted one. Under torchrun, rank r writes the shards with i % world_size == r.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate
from tqdm import tqdm

from kdcache import cache as cachefmt
from kdcache.checkpoint import provenance, sha256_file
from kdcache.coco import load_instances
from kdcache.config import DumpConfig, to_jsonable
from kdcache.data import ViewDataset, heatmap_hw_for
from kdcache.errors import UserError
from kdcache.teacher import load_teacher
from kdcache.transforms import to_input_tensor

log = logging.getLogger(__name__)

TEACHER_SIGMA = 2.0  # ViTPose's training targets; recorded so students can match it


class _EncodedViews(ViewDataset):
    """ViewDataset that also JPEG-encodes the crop in the worker, off the teacher's critical path."""

    def __init__(self, *args: Any, jpeg_quality: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.jpeg_quality = jpeg_quality

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["crop_jpeg"] = cachefmt.encode_crop(item["crop"], self.jpeg_quality)
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    blobs = [item.pop("crop_jpeg") for item in items]
    batch = default_collate(items)
    batch["crop_jpeg"] = blobs
    return batch


def _world() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def dump_settings(cfg: DumpConfig, teacher: torch.nn.Module, teacher_sha: str, num_views: int) -> dict[str, Any]:
    """Everything that decides the cache's content; a rerun must match it exactly to resume."""
    input_hw = tuple(teacher.config.input_hw)
    dump = to_jsonable(cfg)
    dump.pop("run")
    dump["seed"] = cfg.run.seed
    return {
        "schema_version": cachefmt.SCHEMA_VERSION,
        "input_hw": list(input_hw),
        "heatmap_hw": list(heatmap_hw_for(input_hw)),
        "sigma": TEACHER_SIGMA,
        "crop_encoding": f"{cachefmt.CROP_ENCODING}{cfg.jpeg_quality}",
        "heatmap_encoding": cachefmt.HEATMAP_ENCODING,
        "teacher": {"arch": teacher.config.arch, "head": teacher.config.head, "sha256": teacher_sha},
        "dump": {k: v for k, v in dump.items() if k not in ("teacher",)},
        "total_views": num_views,
        "shard_size": cfg.shard_size,
        "num_shards": math.ceil(num_views / cfg.shard_size),
    }


def dump_teacher(cfg: DumpConfig) -> Path:
    """Run the teacher once over every (instance, view) and write the cache; returns its folder."""
    if cfg.views < 1:
        raise UserError(f"--views must be at least 1 (got {cfg.views})")
    out = Path(cfg.run.out)
    teacher = load_teacher(cfg.teacher, cfg.run.device)
    teacher_sha = sha256_file(cfg.teacher) if Path(cfg.teacher).is_file() else "directory"
    instances = load_instances(cfg.ann)
    if not instances:
        raise UserError(f"{cfg.ann} has no usable person instances (non-crowd, with keypoints, positive area)")
    items = [(i, v) for i in range(len(instances)) for v in range(cfg.views)]
    settings = dump_settings(cfg, teacher, teacher_sha, len(items))

    out.mkdir(parents=True, exist_ok=True)
    manifest = cachefmt.read_manifest(out)
    if manifest is None:
        manifest = {**settings, "complete": False, "shards": [], "skipped_images": []}
        cachefmt.write_manifest(out, manifest)
    else:
        differing = [k for k in settings if manifest.get(k) != settings[k]]
        if differing:
            raise UserError(f"{out} holds a cache made with other settings ({', '.join(differing)}); "
                            "rerun with the same flags to resume it, or choose a new --out")
    done = {entry["index"] for entry in manifest["shards"]}
    rank, world = _world()
    todo = [s for s in range(settings["num_shards"]) if s % world == rank and s not in done]
    if done:
        log.info("resuming: %d shards complete, %d to write", len(done), len(todo))

    attrs = {**{k: v for k, v in settings.items() if k != "num_shards"}, **provenance()}
    bar = tqdm(total=len(todo) * cfg.shard_size, unit="view", disable=not cfg.run.progress)
    for shard in todo:
        part = items[shard * cfg.shard_size:(shard + 1) * cfg.shard_size]
        rows = _run_teacher(teacher, part, instances, cfg, bar)
        entry = cachefmt.write_shard(out, shard, rows, {**attrs, "shard_index": shard})
        manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda e: e["index"])
        cachefmt.write_manifest(out, manifest)
    bar.close()
    if len(manifest["shards"]) == settings["num_shards"]:
        manifest["complete"] = True
        cachefmt.write_manifest(out, manifest)
    return out


@torch.inference_mode()
def _run_teacher(teacher: torch.nn.Module, part: list[tuple[int, int]], instances: list, cfg: DumpConfig,
                 bar: tqdm) -> dict[str, Any]:
    """Rows of one shard: crops made in DataLoader workers, teacher batches, quantised heatmaps."""
    input_hw = tuple(teacher.config.input_hw)
    dataset = _EncodedViews(instances, cfg.images, input_hw, cfg.aug, cfg.run.seed, items=part,
                            jpeg_quality=cfg.jpeg_quality)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.run.workers, collate_fn=_collate)
    device = next(teacher.parameters()).device
    columns: dict[str, list] = {name: [] for name in cachefmt.COLUMNS}
    for batch in loader:
        x = to_input_tensor(batch["crop"]).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            heat = teacher(x).float().cpu().numpy()  # [B, K, h, w] float32, before quantisation
        q, value_range = cachefmt.quantize_heatmaps(heat)
        columns["crop"].extend(batch["crop_jpeg"])
        columns["heatmaps"].append(q)
        columns["heatmap_range"].append(value_range)
        for name in ("affine", "flip", "image_id", "ann_id", "view", "keypoints"):
            columns[name].append(batch[name].numpy())
        bar.update(len(q))
    return {name: (values if name == "crop" else np.concatenate(values)) for name, values in columns.items()}
