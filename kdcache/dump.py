"""Stage 1: the teacher over K augmented views of every person instance -> HDF5 shards + manifest.

The people are --ann's annotated ones (`--persons`: with keypoints, as ViTPose trains, or those with a box and no
keypoints), or a detector's boxes on --ann's images (`--boxes`); people without keypoints give rows without
ground truth (row column `labelled` false, their box score kept), and half-body crops are skipped for them.

The dump order is fixed: instances sorted by (image_id, ann_id), K views each; shard i holds rows
[i * shard_size, (i + 1) * shard_size) of it, and teacher batches never straddle shards, so a shard's
bytes depend only on its own views. Three stages overlap:

    DataLoader workers   read, warp and encode the crops of each batch (and flag unreadable images)
    main thread          the teacher forward (and its mirror with --teacher-flip)
    writer thread        heatmap quantisation + deflate, HDF5 writes, checksums, manifest updates
                         (`cache_writer.ShardWriter`)

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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader
from tqdm import tqdm

from kdcache import cache_format as fmt
from kdcache.boxes import detected_person_boxes, detection_instances
from kdcache.cache import check_shards
from kdcache.cache_writer import ShardWriter, drop_shards, manifest_lock, write_manifest
from kdcache.checkpoint import provenance
from kdcache.codec import Codec
from kdcache.coco import (Instance, declares_keypoints, instances_from_coco, keypoint_set_of, load_coco,
                          subject_category_ids)
from kdcache.config import DumpConfig, to_jsonable
from kdcache.data import ViewDataset
from kdcache.distributed import world_from_env
from kdcache.errors import UserError
from kdcache.heatmap_storage import heatmap_storage
from kdcache.inference import predict_heatmaps
from kdcache.keypoints import KeypointSet, is_built_in, keypoint_set_with
from kdcache.teacher import load_teacher, require_keypoint_set, teacher_weights_file
from kdcache.transforms import ViewSampler

log = logging.getLogger(__name__)

# Settings a rerun may change without changing any stored byte.
RESUMABLE_ANYWAY = ("skip_bad_images",)
# What an --out folder may hold before it has a manifest (a dump killed early): anything else is not ours.
_CACHE_FILE_NAMES = (fmt.MANIFEST, fmt.MANIFEST + ".tmp", fmt.LOCK)


class _DumpViews(ViewDataset):
    """ViewDataset for the dump: crops encoded in the worker; an unreadable image gives a `bad` item."""

    def __init__(self, *args: Any, crop_format: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.crop_format = crop_format
        self._identity: tuple[str, np.ndarray] | None = None  # last image's (file, SHA-256 [32] uint8)

    def __getitem__(self, index: int) -> dict[str, Any]:
        inst = self.instances[self.items[index][0]]
        try:
            item = super().__getitem__(index)
        except UserError as exc:  # message names the file; raised in the main process, on one line
            return {"index": index, "file_name": inst.file_name, "bad": str(exc)}
        if self.crop_format != "none":
            item["crop_bytes"] = fmt.encode_crop(item["crop"], self.crop_format)
        else:  # replayed later from the image: record which image it was, to refuse a changed one
            item["image_hw"] = np.array(self._images(inst.file_name).shape[:2], np.int32)  # memoised decode
            item["image_sha256"] = self._image_sha256(inst.file_name)
        item.update(index=index, file_name=inst.file_name, bad=None, labelled=np.bool_(inst.labelled),
                    box_score=np.float32(inst.score))
        return item

    def _image_sha256(self, file_name: str) -> np.ndarray:
        """SHA-256 of the image file's bytes, [32] uint8; views come in image order, so one hash per image."""
        if self._identity is None or self._identity[0] != file_name:
            digest = fmt.sha256_file(Path(self._images.images_dir, file_name))
            self._identity = (file_name, np.frombuffer(bytes.fromhex(digest), np.uint8))
        return self._identity[1]


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Good items stacked: the crops as a uint8 tensor (a worker hands a tensor over in shared memory, where a numpy
    array would be pickled through a pipe and unpickled by the process that feeds the teacher), the row columns as
    numpy arrays; per-item lists for bytes, names and bad images."""
    good = [item for item in items if item["bad"] is None]
    batch: dict[str, Any] = {"bad": [(item["file_name"], item["bad"]) for item in items if item["bad"] is not None],
                             "size": len(items), "index": items[0]["index"]}
    for key in ("crop", *(c.name for c in fmt.ROW_COLUMNS + fmt.REPLAY_COLUMNS)):  # confidence: the teacher's
        batch[key] = np.stack([item[key] for item in good]) if good and key in good[0] else None
    if batch["crop"] is not None:
        batch["crop"] = torch.from_numpy(batch["crop"])
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
    return fmt.sha256_file(teacher_weights_file(path))


def dump_settings(cfg: DumpConfig, teacher: torch.nn.Module, keypoint_set: KeypointSet, teacher_sha: str,
                  instances: list[Instance]) -> dict[str, Any]:
    """Everything that decides the cache's content; a rerun must match it exactly to resume."""
    codec: Codec = teacher.codec  # the teacher family's: the targets it was trained with
    dump = to_jsonable(cfg)
    dump.pop("run")
    dump["seed"] = cfg.run.seed
    for key in ("teacher", "ann", "images", "boxes"):  # absolute: crop replay and reruns from another folder
        dump[key] = None if dump[key] is None else str(Path(dump[key]).resolve())
    num_views = len(instances) * cfg.views
    labelled = sum(inst.labelled for inst in instances)
    return {
        "schema_version": fmt.SCHEMA_VERSION,
        "codec": codec.to_record(),
        "keypoint_set": keypoint_set.name,
        # a set described in a file travels whole with the cache (built-in ones by name)
        **({} if is_built_in(keypoint_set.name) else {"keypoint_set_description": keypoint_set.description()}),
        "input_hw": list(codec.input_hw),  # the codec's, repeated for readers that know schema 2 only
        "heatmap_hw": list(codec.heatmap_hw),
        "sigma": codec.sigma,
        "crop_encoding": cfg.crop_format,
        "heatmap_encoding": cfg.heatmap_storage,
        "heatmap_rel_error": cfg.heatmap_rel_error,
        "teacher_flip": cfg.teacher_flip,
        "teacher": {"kind": teacher.kind, "arch": teacher.config.arch, "head": getattr(teacher.config, "head", None),
                    "sha256": teacher_sha, "expert": cfg.expert, "config": teacher.config.to_dict()},
        "dump": dump,
        # Where the people came from; rows of the unlabelled ones carry no ground truth (row column `labelled`).
        "persons": {"source": "detections" if cfg.boxes is not None else "annotations",
                    "instances": len(instances), "labelled": labelled, "unlabelled": len(instances) - labelled},
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
    with manifest_lock(out):
        manifest = fmt.read_manifest(out)
        if manifest is None:
            manifest = {**settings, "complete": False, "shards": [], "skipped_images": []}
            write_manifest(out, manifest)
            return manifest
    if manifest.get("schema_version") != fmt.SCHEMA_VERSION:
        raise UserError(f"{out} holds a cache of schema version {manifest.get('schema_version')}; "
                        f"this kdcache writes version {fmt.SCHEMA_VERSION}: choose a new --out")
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
    if not (out / fmt.MANIFEST).exists():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in
                         _CACHE_FILE_NAMES and not p.name.startswith("shard-"))
        if foreign:
            raise UserError(f"--out {out} holds other files ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}) and no kdcache cache; "
                            "choose a new or empty folder")


def _drop_damaged_shards(out: Path, manifest: dict[str, Any], mine: set[int], verify: bool) -> dict[str, Any]:
    """Unlist this rank's listed shards that are missing, truncated, unreadable (or, with `verify`, whose
    SHA-256 differs), so that they are written again; returns the manifest as it now stands."""
    problems = check_shards(out, [e for e in manifest["shards"] if e["index"] in mine], verify)
    if not problems:
        return manifest
    for problem in problems.values():
        log.warning("rewriting damaged shard %s", problem)
    return drop_shards(out, set(problems))


def dump_teacher(cfg: DumpConfig, verify: bool = False) -> Path:
    """Run the teacher once over every (instance, view) and write the cache; returns its folder.

    Args:
        verify: on a rerun, also compare each listed shard's SHA-256 with the manifest (reads the whole
            cache once) and rewrite those that differ; sizes, headers and row counts are always checked.
    """
    if cfg.views < 1:
        raise UserError(f"--views must be at least 1 (got {cfg.views})")
    fmt.parse_crop_format(cfg.crop_format)
    heatmap_storage(cfg.heatmap_storage)
    if not 0 < cfg.heatmap_rel_error < 0.5:
        raise UserError(f"--heatmap-error must be in (0, 0.5) (got {cfg.heatmap_rel_error})")
    out = Path(cfg.run.out)
    _check_out_folder(out)
    if not Path(cfg.images).is_dir():
        raise UserError(f"--images {cfg.images} is not a folder; pass the folder holding {Path(cfg.ann).name}'s images")
    if cfg.boxes is not None and cfg.persons != "labelled":
        raise UserError("--persons chooses among --ann's annotated people, --boxes replaces them: give one of them")
    coco = load_coco(cfg.ann, cfg.keypoint_set)
    if cfg.boxes is None:
        instances = _annotated_instances(coco, cfg)
    else:  # read and checked before the teacher loads; its keypoint count may size them
        boxes = detected_person_boxes(cfg.ann, cfg.boxes, cfg.box_score_thr, coco, purpose="dump")
    teacher = load_teacher(cfg.teacher, _device(cfg.run.device), expert=cfg.expert)
    # A file that names no keypoints (an image-info file) dumps the teacher's own set, unless one is chosen.
    chosen = declares_keypoints(coco) or cfg.boxes is None or cfg.keypoint_set is not None
    keypoint_set = (keypoint_set_of(coco, cfg.ann) if chosen
                    else keypoint_set_with(teacher.config.num_keypoints, str(cfg.teacher)))
    require_keypoint_set(teacher, keypoint_set, cfg.teacher, cfg.expert)
    if cfg.boxes is not None:
        instances = detection_instances(boxes, keypoint_set.num_keypoints)
    unlabelled = sum(not inst.labelled for inst in instances)
    if unlabelled:
        log.info("%d of %d people have no ground truth: their rows carry none, and half-body crops (which need "
                 "keypoints) are skipped for them", unlabelled, len(instances))
    teacher_sha = _teacher_sha(Path(cfg.teacher))
    items = [(i, v) for i in range(len(instances)) for v in range(cfg.views)]
    settings = dump_settings(cfg, teacher, keypoint_set, teacher_sha, instances)

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
        sampler = ViewSampler(cfg.aug, teacher.codec, keypoint_set, cfg.run.seed)
        dataset = _DumpViews(instances, cfg.images, sampler, items=items, crop_format=cfg.crop_format)
        _run(teacher, dataset, todo, cfg, out, attrs, show=cfg.run.progress and rank == 0)
    return out


def _annotated_instances(coco: COCO, cfg: DumpConfig) -> list[Instance]:
    """The people of --ann that --persons asks for; refused, with what to pass instead, when there are none."""
    instances = instances_from_coco(coco, cfg.ann, cfg.persons)
    if instances:
        return instances
    subjects = subject_category_ids(coco)
    people = sum(1 for a in coco.dataset.get("annotations", []) if a.get("category_id") in subjects)
    if not people:
        raise UserError(f"{cfg.ann} holds no annotated people (an image-info file?): pass --boxes DETS.json, a "
                        "person detector's boxes on its images, to dump them without ground truth")
    if cfg.persons == "labelled":
        raise UserError(f"{cfg.ann} has no usable person with keypoints (non-crowd, labelled keypoints, positive "
                        "area): pass --persons unlabelled to dump its people's boxes without ground truth, or "
                        "--boxes DETS.json")
    raise UserError(f"{cfg.ann} has no usable person for --persons {cfg.persons} (non-crowd, positive area)")


def _batches(todo: list[int], num_items: int, cfg: DumpConfig) -> list[list[int]]:
    """Teacher batches: each shard cut from its own first row, so a shard's batches never vary."""
    out = []
    for shard in todo:
        stop = min((shard + 1) * cfg.shard_size, num_items)
        out.extend(list(range(s, min(s + cfg.batch_size, stop)))
                   for s in range(shard * cfg.shard_size, stop, cfg.batch_size))
    return out


def _run(teacher: torch.nn.Module, dataset: _DumpViews, todo: list[int], cfg: DumpConfig, out: Path,
         attrs: dict[str, Any], show: bool) -> None:
    sampler = dataset.sampler
    num_items = len(dataset)
    loader = DataLoader(dataset, batch_sampler=_batches(todo, num_items, cfg), num_workers=cfg.run.workers,
                        collate_fn=_collate, prefetch_factor=4 if cfg.run.workers else None,
                        persistent_workers=False)
    writer = ShardWriter(out, attrs, (sampler.keypoint_set.num_keypoints, *sampler.codec.heatmap_hw),
                         heatmap_storage(cfg.heatmap_storage), cfg.heatmap_rel_error, cfg.gzip_level,
                         replay=cfg.crop_format == "none")
    expected = {s: min((s + 1) * cfg.shard_size, num_items) - s * cfg.shard_size for s in todo}
    bar = tqdm(total=sum(expected.values()), unit="view", disable=not show)
    try:
        for batch in loader:
            shard = batch["index"] // cfg.shard_size
            if batch["bad"] and not cfg.skip_bad_images:
                writer.close()
                file_name, message = batch["bad"][0]
                raise UserError(f"{message} (pass --skip-bad-images to go on without it; complete shards are "
                                "kept and the same command resumes)")
            heat = None if batch["crop"] is None else predict_heatmaps(
                teacher, batch["crop"], sampler.codec, sampler.keypoint_set, cfg.teacher_flip).cpu().numpy()
            writer.put(shard, batch, heat)
            expected[shard] -= batch["size"]
            if expected[shard] == 0:
                writer.end_shard(shard)
            bar.update(batch["size"])
    finally:
        bar.close()
        writer.close()
