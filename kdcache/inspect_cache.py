"""`kdcache inspect`: what a cache holds, what it cost on disk, and a picture of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kdcache.cache import open_cache


def cache_summary(path: Path) -> dict[str, Any]:
    """Views, instances, bytes per view, teacher and settings of the cache at `path`."""
    cache = open_cache(path, allow_incomplete=True)
    m = cache.manifest
    ann_ids, image_ids = set(), set()
    for shard in cache.shards:
        with h5py.File(cache.path / shard["name"], "r") as f:
            ann_ids.update(f["ann_id"][:].tolist())
            image_ids.update(f["image_id"][:].tolist())
    total_bytes = sum((cache.path / s["name"]).stat().st_size for s in cache.shards)
    return {
        "path": str(cache.path),
        "complete": bool(m.get("complete")),
        "shards": f"{len(cache.shards)} of {m.get('num_shards')}",
        "views": len(cache),
        "instances": len(ann_ids),
        "images": len(image_ids),
        "views_per_instance": m["dump"]["views"],
        "bytes": total_bytes,
        "kb_per_view": total_bytes / max(1, len(cache)) / 1000.0,
        "teacher": m["teacher"],
        "input_hw": m["input_hw"],
        "heatmap_hw": m["heatmap_hw"],
        "sigma": m["sigma"],
        "crop_encoding": m["crop_encoding"],
        "heatmap_encoding": m["heatmap_encoding"],
        "seed": m["dump"]["seed"],
        "skipped_images": m.get("skipped_images", []),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for key, value in summary.items():
        if key == "kb_per_view":
            value = f"{value:.1f}"
        elif key == "teacher":
            value = f"{value['arch']} ({value['head']} head), sha256 {value['sha256'][:16]}..."
        elif key == "skipped_images":
            value = ", ".join(value) if value else "none"
        lines.append(f"{key:18s} {value}")
    return "\n".join(lines)


def contact_sheet_of(path: Path, png: Path, count: int = 16) -> Path:
    """PNG of `count` views spread over the cache: crops with their cached heatmaps and decoded skeleton."""
    from kdcache.viz import contact_sheet

    cache = open_cache(path, allow_incomplete=True)
    picks = np.unique(np.linspace(0, len(cache) - 1, num=min(count, len(cache))).round().astype(int))
    rows = [cache[int(i)] for i in picks]
    titles = [f"ann {r['ann_id']} v{r['view']}{' flip' if r['flip'] else ''}" for r in rows]
    return contact_sheet(np.stack([r["crop"] for r in rows]), np.stack([r["heatmaps"] for r in rows]),
                         Path(png), titles=titles)
