"""`kdcache inspect`: what a cache holds, what it cost on disk, and a picture of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kdcache.cache import open_cache
from kdcache.errors import UserError
from kdcache.viz import contact_sheet

SHEET_VIEWS = 16  # views drawn on a contact sheet
# Datasets by what they are, for the bytes-per-view breakdown.
CROP_DATASETS = ("crop", "crop_offset", "image_file", "image_hw", "image_sha256")
HEATMAP_DATASETS = ("heatmaps", "heatmap_step", "heatmap_range")


def cache_summary(path: Path) -> dict[str, Any]:
    """Views, instances, bytes per view (in total and by part), teacher and settings of the cache at `path`."""
    cache = open_cache(path, allow_incomplete=True)
    m = cache.manifest
    ann_ids, image_ids = set(), set()
    parts = {"crop": 0, "heatmaps": 0, "metadata": 0}
    total_bytes = 0
    for shard in cache.shards:
        shard_path = cache.path / shard["name"]
        total_bytes += shard_path.stat().st_size
        with h5py.File(shard_path, "r") as f:
            ann_ids.update(f["ann_id"][:].tolist())
            image_ids.update(f["image_id"][:].tolist())
            for name, ds in f.items():
                part = "crop" if name in CROP_DATASETS else "heatmaps" if name in HEATMAP_DATASETS else "metadata"
                parts[part] += ds.id.get_storage_size()
    views = max(1, len(cache))
    dump = m.get("dump", {})
    return {
        "path": str(cache.path),
        "schema_version": m["schema_version"],
        "complete": bool(m.get("complete")),
        "shards": f"{len(cache.shards)} of {m.get('num_shards')}",
        "views": len(cache),
        "instances": len(ann_ids),
        "images": len(image_ids),
        "views_per_instance": dump.get("views"),
        # Where the people came from; schema < 4 caches hold annotated people only.
        "persons": m.get("persons", {"source": "annotations", "instances": len(ann_ids), "labelled": len(ann_ids),
                                     "unlabelled": 0}),
        "bytes": total_bytes,
        "kb_per_view": total_bytes / views / 1000.0,
        # HDF5 headers, attributes and free space are the rest of kb_per_view.
        "kb_per_view_parts": {k: round(v / views / 1000.0, 2) for k, v in parts.items()},
        "teacher": m["teacher"],
        "teacher_flip": bool(m.get("teacher_flip", False)),
        "codec": cache.codec.name,  # how its crops were cut and its heatmaps are read (the teacher family's)
        "keypoint_set": f"{cache.keypoint_set.name} ({cache.keypoint_set.num_keypoints} keypoints)",
        "input_hw": m["input_hw"],
        "heatmap_hw": m["heatmap_hw"],
        "sigma": m["sigma"],
        "crop_encoding": m["crop_encoding"],
        "heatmap_encoding": m["heatmap_encoding"],
        "heatmap_rel_error": m.get("heatmap_rel_error"),
        "seed": dump.get("seed"),
        "augmentation": dump.get("aug"),
        "skipped_images": m.get("skipped_images", []),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for key, value in summary.items():
        if key == "kb_per_view":
            value = f"{value:.1f}"
        elif key == "kb_per_view_parts":
            value = ", ".join(f"{k} {v:.1f}" for k, v in value.items())
        elif key == "teacher":
            head = f" ({value['head']} head)" if value.get("head") else ""
            value = f"{value['arch']}{head}, sha256 {value['sha256'][:16]}..."
        elif key == "augmentation" and isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif key == "persons":
            value = (f"{value['instances']} from {value['source']}: {value['labelled']} with ground truth, "
                     f"{value['unlabelled']} without" +
                     (" (their rows carry no ground truth; half-body crops, which need keypoints, skipped for them)"
                      if value["unlabelled"] else ""))
        elif key == "skipped_images":
            value = f"{len(value)}: " + ", ".join(value) if value else "none"
        lines.append(f"{key:18s} {value}")
    return "\n".join(lines)


def contact_sheet_of(path: Path, png: Path, count: int = SHEET_VIEWS) -> Path:
    """PNG of `count` views spread over the cache: crops with their cached heatmaps and decoded skeleton."""
    cache = open_cache(path, allow_incomplete=True)
    if len(cache) == 0:
        raise UserError(f"cache {path} holds no views to draw")
    picks = np.unique(np.linspace(0, len(cache) - 1, num=min(count, len(cache))).round().astype(int))
    rows = [cache[int(i)] for i in picks]
    titles = [f"ann {r['ann_id']} v{r['view']}{' flip' if r['flip'] else ''}" for r in rows]
    return contact_sheet(np.stack([r["crop"] for r in rows]), np.stack([r["heatmaps"] for r in rows]),
                         Path(png), cache.codec, cache.keypoint_set, titles=titles)
