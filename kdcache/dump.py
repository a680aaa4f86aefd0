"""Stage 1: the teacher over K augmented views of every person instance -> HDF5 shards + manifest.

The dump order is fixed: instances sorted by (image_id, ann_id), K views each; shard i holds rows
[i * shard_size, (i + 1) * shard_size) of it, and teacher batches never straddle shards, so a shard's
bytes depend only on its own views. Three stages overlap:

    DataLoader workers   read, warp and encode the crops of each batch (and flag unreadable images)
    main thread          the teacher forward (and its mirror with --teacher-flip)
    writer thread        heatmap quantisation + deflate, HDF5 writes, checksums, manifest updates

A rerun with the same settings checks the shards the manifest lists (size, HDF5 header and rows; SHA-256
too with `verify`), unlists and rewrites the damaged ones, skips the sound ones and writes the rest, so an
interrupted or damaged dump finishes with exactly the bytes of an uninterrupted one. Under torchrun, rank r
writes (and checks) the shards with i % world_size == r and records each one in the shared manifest under a
file lock. A failed write (a full disk) raises its OSError and leaves no temporary file; the shards already
listed stay intact, and the same command resumes once the disk has room.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache import cache as cachefmt
from kdcache import heatmaps as codec
from kdcache.checkpoint import provenance
from kdcache.coco import Instance, load_instances
from kdcache.config import DumpConfig, to_jsonable
from kdcache.data import ViewDataset, heatmap_hw_for
from kdcache.distributed import world_from_env
from kdcache.errors import UserError
from kdcache.teacher import load_teacher, require_coco_keypoints
from kdcache.teacher_formats import hf_weight_file
from kdcache.transforms import to_input_tensor

log = logging.getLogger(__name__)

TEACHER_SIGMA = 2.0  # ViTPose's training targets; recorded so students can match it
# Settings a rerun may change without changing any stored byte.
RESUMABLE_ANYWAY = ("skip_bad_images",)
# What an --out folder may hold before it has a manifest (a dump killed early): anything else is not ours.
_CACHE_FILE_NAMES = (cachefmt.MANIFEST, cachefmt.MANIFEST + ".tmp", cachefmt.LOCK)


class _DumpViews(ViewDataset):
    """ViewDataset for the dump: crops encoded in the worker; an unreadable image gives a `bad` item."""

    def __init__(self, *args: Any, crop_encoding: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.crop_encoding = crop_encoding
        self._identity: tuple[str, np.ndarray] | None = None  # last image's (file, SHA-256 [32] uint8)

    def __getitem__(self, index: int) -> dict[str, Any]:
        inst = self.instances[self.items[index][0]]
        try:
            item = super().__getitem__(index)
        except UserError as exc:  # message names the file; raised in the main process, on one line
            return {"index": index, "file_name": inst.file_name, "bad": str(exc)}
        if self.crop_encoding != "none":
            item["crop_bytes"] = cachefmt.encode_crop(item["crop"], self.crop_encoding)
        else:  # replayed later from the image: record which image it was, to refuse a changed one
            item["image_hw"] = np.array(self._images(inst.file_name).shape[:2], np.int32)  # memoised decode
            item["image_sha256"] = self._image_sha256(inst.file_name)
        item.update(index=index, file_name=inst.file_name, bad=None)
        return item

    def _image_sha256(self, file_name: str) -> np.ndarray:
        """SHA-256 of the image file's bytes, [32] uint8; views come in image order, so one hash per image."""
        if self._identity is None or self._identity[0] != file_name:
            digest = cachefmt.sha256_file(Path(self._images.images_dir, file_name))
            self._identity = (file_name, np.frombuffer(bytes.fromhex(digest), np.uint8))
        return self._identity[1]


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Good items stacked as numpy arrays; per-item lists for bytes, names and bad images."""
    good = [item for item in items if item["bad"] is None]
    batch: dict[str, Any] = {"bad": [(item["file_name"], item["bad"]) for item in items if item["bad"] is not None],
                             "size": len(items), "index": items[0]["index"]}
    for key in ("crop", "affine", "flip", "image_id", "ann_id", "view", "keypoints", *cachefmt.REPLAY_COLUMNS):
        batch[key] = np.stack([item[key] for item in good]) if good and key in good[0] else None
    batch["crop_bytes"] = [item.get("crop_bytes") for item in good]
    batch["file_name"] = [item["file_name"] for item in good]
    return batch


def _device(device: str) -> str:
    """Under torchrun, plain "cuda" means this rank's GPU."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _teacher_sha(path: Path) -> str:
    """SHA-256 of the teacher's weights: the file, or a HuggingFace folder's weight file."""
    return cachefmt.sha256_file(path if path.is_file() else hf_weight_file(path))


def dump_settings(cfg: DumpConfig, teacher: torch.nn.Module, teacher_sha: str, num_views: int) -> dict[str, Any]:
    """Everything that decides the cache's content; a rerun must match it exactly to resume."""
    input_hw = tuple(teacher.config.input_hw)
    dump = to_jsonable(cfg)
    dump.pop("run")
    dump["seed"] = cfg.run.seed
    for key in ("teacher", "ann", "images"):  # absolute: crop replay and reruns from another folder
        dump[key] = str(Path(dump[key]).resolve())
    return {
        "schema_version": cachefmt.SCHEMA_VERSION,
        "input_hw": list(input_hw),
        "heatmap_hw": list(heatmap_hw_for(input_hw)),
        "sigma": TEACHER_SIGMA,
        "crop_encoding": cfg.crop_encoding,
        "heatmap_encoding": cfg.heatmap_encoding,
        "heatmap_rel_error": cfg.heatmap_rel_error,
        "teacher_flip": cfg.teacher_flip,
        "teacher": {"arch": teacher.config.arch, "head": teacher.config.head, "sha256": teacher_sha,
                    "expert": cfg.expert, "config": teacher.config.to_dict()},
        "dump": dump,
        "total_views": num_views,
        "shard_size": cfg.shard_size,
        "num_shards": math.ceil(num_views / cfg.shard_size),
    }


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    out = dict(settings)
    out["dump"] = {k: v for k, v in settings.get("dump", {}).items() if k not in RESUMABLE_ANYWAY}
    return out


def _open_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Create the manifest, or check that the existing one was made with the same settings."""
    with cachefmt.manifest_lock(out):
        manifest = cachefmt.read_manifest(out)
        if manifest is None:
            manifest = {**settings, "complete": False, "shards": [], "skipped_images": []}
            cachefmt.write_manifest(out, manifest)
            return manifest
    if manifest.get("schema_version") != cachefmt.SCHEMA_VERSION:
        raise UserError(f"{out} holds a cache of schema version {manifest.get('schema_version')}; "
                        f"this kdcache writes version {cachefmt.SCHEMA_VERSION}: choose a new --out")
    mine, theirs = _comparable(settings), _comparable(manifest)
    differing = [k for k in mine if theirs.get(k) != mine[k]]
    if differing:
        detail = [k for k in mine.get("dump", {}) if theirs.get("dump", {}).get(k) != mine["dump"][k]]
        raise UserError(f"{out} holds a cache made with other settings ({', '.join(differing + detail)}); "
                        "rerun with the same flags to resume it, or choose a new --out")
    return manifest


def _check_out_folder(out: Path) -> None:
    """Refuse, before any work, an --out that cannot hold the cache: a file, a folder of other things, or
    one where no file can be created (it is made here if missing, as the dump would)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder for the cache")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # unnamed where the OS allows: nothing left if killed
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise UserError(f"cannot write into --out {out} ({reason}); choose a folder you can write to") from None
    if not (out / cachefmt.MANIFEST).exists():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in
                         _CACHE_FILE_NAMES and not p.name.startswith("shard-"))
        if foreign:
            raise UserError(f"--out {out} holds other files ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}) and no kdcache cache; "
                            "choose a new or empty folder")


def _drop_damaged_shards(out: Path, manifest: dict[str, Any], mine: set[int], verify: bool) -> dict[str, Any]:
    """Unlist this rank's listed shards that are missing, truncated, unreadable (or, with `verify`, whose
    SHA-256 differs), so that they are written again; returns the manifest as it now stands."""
    problems = cachefmt.check_shards(out, [e for e in manifest["shards"] if e["index"] in mine], verify)
    if not problems:
        return manifest
    for problem in problems.values():
        log.warning("rewriting damaged shard %s", problem)
    return cachefmt.drop_shards(out, set(problems))


def dump_teacher(cfg: DumpConfig, verify: bool = False) -> Path:
    """Run the teacher once over every (instance, view) and write the cache; returns its folder.

    Args:
        verify: on a rerun, also compare each listed shard's SHA-256 with the manifest (reads the whole
            cache once) and rewrite those that differ; sizes, headers and row counts are always checked.
    """
    if cfg.views < 1:
        raise UserError(f"--views must be at least 1 (got {cfg.views})")
    cachefmt.parse_crop_encoding(cfg.crop_encoding)
    cachefmt.heatmap_encoding(cfg.heatmap_encoding)
    if not 0 < cfg.heatmap_rel_error < 0.5:
        raise UserError(f"--heatmap-error must be in (0, 0.5) (got {cfg.heatmap_rel_error})")
    out = Path(cfg.run.out)
    _check_out_folder(out)
    if not Path(cfg.images).is_dir():
        raise UserError(f"--images {cfg.images} is not a folder; pass the folder holding {Path(cfg.ann).name}'s images")
    teacher = load_teacher(cfg.teacher, _device(cfg.run.device), expert=cfg.expert)
    require_coco_keypoints(teacher, cfg.teacher, cfg.expert)
    teacher_sha = _teacher_sha(Path(cfg.teacher))
    instances = load_instances(cfg.ann)
    if not instances:
        raise UserError(f"{cfg.ann} has no usable person instances (non-crowd, with keypoints, positive area)")
    items = [(i, v) for i in range(len(instances)) for v in range(cfg.views)]
    settings = dump_settings(cfg, teacher, teacher_sha, len(items))

    manifest = _open_manifest(out, settings)
    rank, world = world_from_env()
    mine = {s for s in range(settings["num_shards"]) if s % world == rank}
    manifest = _drop_damaged_shards(out, manifest, mine, verify)
    done = {entry["index"] for entry in manifest["shards"]}
    todo = sorted(mine - done)
    if done:
        log.info("resuming: %d shards complete, %d to write on rank %d", len(done), len(todo), rank)
    if todo:
        attrs = {**{k: v for k, v in settings.items() if k != "num_shards"}, **provenance()}
        _run(teacher, instances, items, todo, cfg, out, attrs, show=cfg.run.progress and rank == 0)
    return out


def _batches(todo: list[int], num_items: int, cfg: DumpConfig) -> list[list[int]]:
    """Teacher batches: each shard cut from its own first row, so a shard's batches never vary."""
    out = []
    for shard in todo:
        stop = min((shard + 1) * cfg.shard_size, num_items)
        out.extend(list(range(s, min(s + cfg.batch_size, stop)))
                   for s in range(shard * cfg.shard_size, stop, cfg.batch_size))
    return out


@torch.inference_mode()
def _teacher_heatmaps(teacher: torch.nn.Module, crops: np.ndarray, flip: bool) -> np.ndarray:
    """crops: [B, H, W, 3] uint8 -> heatmaps [B, K, h, w] float32 (mirror-averaged when `flip`)."""
    device = next(teacher.parameters()).device
    x = to_input_tensor(crops).to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        heat = teacher(x).float()
        if flip:
            heat = (heat + codec.flip_heatmaps(teacher(torch.flip(x, dims=[3])).float())) * 0.5
    return heat.cpu().numpy()


def _run(teacher: torch.nn.Module, instances: list[Instance], items: list[tuple[int, int]], todo: list[int],
         cfg: DumpConfig, out: Path, attrs: dict[str, Any], show: bool) -> None:
    input_hw = tuple(teacher.config.input_hw)
    dataset = _DumpViews(instances, cfg.images, input_hw, cfg.aug, cfg.run.seed, items=items,
                         crop_encoding=cfg.crop_encoding)
    loader = DataLoader(dataset, batch_sampler=_batches(todo, len(items), cfg), num_workers=cfg.run.workers,
                        collate_fn=_collate, prefetch_factor=4 if cfg.run.workers else None,
                        persistent_workers=False)
    writer = _ShardWriter(out, attrs, cfg, (len(instances[0].keypoints), *heatmap_hw_for(input_hw)))
    expected = {s: min((s + 1) * cfg.shard_size, len(items)) - s * cfg.shard_size for s in todo}
    bar = tqdm(total=sum(expected.values()), unit="view", disable=not show)
    try:
        for batch in loader:
            shard = batch["index"] // cfg.shard_size
            if batch["bad"] and not cfg.skip_bad_images:
                writer.close()
                file_name, message = batch["bad"][0]
                raise UserError(f"{message} (pass --skip-bad-images to go on without it; complete shards are "
                                "kept and the same command resumes)")
            heat = _teacher_heatmaps(teacher, batch["crop"], cfg.teacher_flip) if batch["crop"] is not None else None
            writer.put(shard, batch, heat)
            expected[shard] -= batch["size"]
            if expected[shard] == 0:
                writer.end_shard(shard)
            bar.update(batch["size"])
    finally:
        bar.close()
        writer.close()


class _ShardWriter:
    """Heatmap encoding on a small thread pool, shard assembly and writes on one background thread.

    Batches arrive in order on a bounded queue (the teacher never runs more than a few batches ahead);
    each batch's quantisation and deflate starts at once on the pool (zlib and numpy release the GIL),
    so on a GPU machine one thread's ~2 ms per view does not cap the dump. An error on either is raised
    in the main thread at its next `put` or at `close`.
    """

    ENCODE_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))  # the other half: teacher and workers

    def __init__(self, out: Path, attrs: dict[str, Any], cfg: DumpConfig, heatmap_shape: tuple[int, int, int]):
        self.out, self.attrs, self.cfg, self.heatmap_shape = out, attrs, cfg, heatmap_shape
        self.side = cachefmt.heatmap_encoding(cfg.heatmap_encoding).side
        self.pool = ThreadPoolExecutor(self.ENCODE_THREADS, thread_name_prefix="kdcache-encode")
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.rows: dict[str, list] = {}
        self.thread = threading.Thread(target=self._loop, name="kdcache-shard-writer", daemon=True)
        self.thread.start()

    def put(self, shard: int, batch: dict[str, Any], heat: np.ndarray | None) -> None:
        self._raise()
        batch = {k: v for k, v in batch.items() if k != "crop"}  # the writer keeps the encoded crops only
        encoded = None if heat is None else self.pool.submit(self._encode, heat)
        self.queue.put(("batch", shard, batch, encoded))

    def end_shard(self, shard: int) -> None:
        self._raise()
        self.queue.put(("end", shard, None, None))

    def close(self) -> None:
        """Finish the queued work (shards already ended are written; a partial shard is dropped)."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.pool.shutdown()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _encode(self, heat: np.ndarray) -> tuple[list[bytes], np.ndarray | None, np.ndarray]:
        """heat: [B, K, h, w] float32 -> (deflated chunks, side array, confidence [B, K])."""
        cfg = self.cfg
        chunks, side = cachefmt.encode_heatmap_rows(heat, cfg.heatmap_encoding, cfg.heatmap_rel_error,
                                                    cfg.gzip_level)
        return chunks, side, heat.max(axis=(2, 3))

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread raises the error
            try:
                self._do(*job)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc

    def _do(self, kind: str, shard: int, batch: dict[str, Any] | None, encoded: Future | None) -> None:
        if kind == "end":
            self._write(shard)
            return
        rows = self.rows
        if not rows:
            rows.update({name: [] for name in ("heatmaps", "crop", "image_file", "skipped_images",
                                               *cachefmt.META_COLUMNS, *cachefmt.REPLAY_COLUMNS)})
            if self.side:
                rows[self.side] = []
        rows["skipped_images"].extend(name for name, _ in batch["bad"])
        if encoded is None:  # every view of the batch was skipped
            return
        chunks, side, confidence = encoded.result()
        rows["heatmaps"].extend(chunks)
        if self.side:
            rows[self.side].append(side)
        rows["confidence"].append(confidence)
        for name in ("affine", "flip", "image_id", "ann_id", "view", "keypoints"):
            rows[name].append(batch[name])
        rows["crop"].extend(batch["crop_bytes"])
        rows["image_file"].extend(batch["file_name"])
        for name in cachefmt.REPLAY_COLUMNS:
            if batch[name] is not None:
                rows[name].append(batch[name])

    def _write(self, shard: int) -> None:
        cfg, k = self.cfg, self.heatmap_shape[0]
        empty = {"confidence": (0, k), "affine": (0, 2, 3), "keypoints": (0, k, 3),  # a shard of bad images
                 **{name: (0, *shape) for name, shape in cachefmt.REPLAY_SHAPES.items()}}
        rows = {name: (values if name in ("heatmaps", "crop", "image_file", "skipped_images") else
                       np.concatenate(values) if values else np.zeros(empty.get(name, (0,))))
                for name, values in self.rows.items()}
        unused = ("crop",) if cfg.crop_encoding == "none" else ("image_file", *cachefmt.REPLAY_COLUMNS)
        rows.update(dict.fromkeys(unused))
        entry = cachefmt.write_shard(self.out, shard, rows, {**self.attrs, "shard_index": shard},
                                     self.heatmap_shape, cfg.heatmap_encoding, cfg.gzip_level)
        cachefmt.add_shard(self.out, entry)
        self.rows = {}
