"""A cache as a whole: open one for reading, and check that it is sound.

The contract (layout, row schema, manifest) is `kdcache.cache_format`, heatmap storages are
`kdcache.heatmap_storage`, writing is `kdcache.cache_writer` and random access is `kdcache.cache_reader`;
this module is their front: `open_cache` (stable API) and the integrity checks that `inspect --verify`,
`train-student` and a resumed dump run. None of them imports torch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py

from kdcache.cache_format import MANIFEST, READABLE_SCHEMAS, read_manifest, sha256_file
from kdcache.cache_reader import Cache
from kdcache.errors import UserError


def open_cache(path: Path, allow_incomplete: bool = False, images: Path | None = None) -> Cache:
    """Read-only view of the cache at `path`: `len()`, and `[i]` a dict (`Cache.__getitem__`).

    Args:
        allow_incomplete: open a cache whose dump has not finished (its complete shards only).
        images: image folder for crop replay when the cache stores no crops (default: the dump's).
    """
    return Cache(path, allow_incomplete=allow_incomplete, images=images)


def check_shard(path: Path, entry: dict[str, Any], checksums: bool) -> str | None:
    """What is wrong with one listed shard ("NAME: what"), or None.

    Size, HDF5 header and row count always; the SHA-256 (every byte read) only with `checksums`.
    """
    name = entry["name"]
    if not path.exists():
        return f"{name}: missing"
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        return f"{name}: {size} bytes, manifest says {entry['bytes']} (truncated or overwritten)"
    if checksums and sha256_file(path) != entry["sha256"]:
        return f"{name}: checksum mismatch (corrupt)"
    try:
        with h5py.File(path, "r") as f:
            rows = len(f["view"])
            if rows != entry["rows"]:
                return f"{name}: {rows} rows, manifest says {entry['rows']}"
    except (OSError, KeyError) as exc:
        return f"{name}: unreadable HDF5 ({exc})"
    return None


def check_shards(path: Path, entries: list[dict[str, Any]], checksums: bool) -> dict[int, str]:
    """`check_shard` over manifest entries on a few threads (hashlib releases the GIL): index -> problem."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda e: check_shard(Path(path) / e["name"], e, checksums), entries)
        return {entry["index"]: problem for entry, problem in zip(entries, found) if problem}


def verify_cache(path: Path, checksums: bool = True) -> list[str]:
    """Problems found in a cache: incomplete, missing, truncated or corrupt shards. Empty = sound.

    Args:
        checksums: also compare every shard's SHA-256 with the manifest (reads every byte, on a few
            threads); without it only sizes, row counts and HDF5 headers are checked.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except UserError as exc:
        return [str(exc)]
    if manifest is None:
        return [f"{path / MANIFEST} is missing"]
    problems = []
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        problems.append(f"schema version {manifest.get('schema_version')} is not readable by this kdcache")
    if not manifest.get("complete"):
        problems.append(f"incomplete: {len(manifest.get('shards', []))} of {manifest.get('num_shards')} shards")
    problems.extend(check_shards(path, manifest.get("shards", []), checksums).values())
    return problems
