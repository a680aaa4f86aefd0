"""`kdcache synth`: a procedurally rendered person-keypoint dataset in exact COCO layout.

Writes `OUT/annotations/person_keypoints_{train,val}.json` and `OUT/{train,val}/<image id>.jpg`.
Each image is a cluttered background (colour gradients, coarse noise, rectangles, ellipses, lines and
limb-like sticks) with 1-4 articulated people from `synth_figure` (human proportions, joint limits,
pose families, yaw and lean), dressed in textured shirts and trousers (solid, stripes, checks, noise)
with skin, shoes and hair, and drawn far to near so that nearer people occlude farther ones (the painting is
`synth_paint`'s).

Each person is first rasterised into a material label map; the labels give the person's mask (area,
bbox) and the occlusion test: a keypoint inside the image but covered by a nearer person's mask gets
v=1, one outside the image v=0 with x=y=0 (as COCO), the others v=2 (face points may be v=1/v=0 from
the head's own orientation). People whose mask is less than a third visible (occlusion plus truncation)
or with fewer than five labelled keypoints are not drawn. `bbox` is the tight box of the person's mask
clipped to the image, `area` the pixel count of that mask inside the image (including the parts that
nearer people hide: it is the person's scale for OKS), `segmentation` the bbox as a polygon.

With `unlabelled_images` > 0 a third split, `OUT/unlabelled/` (image ids from 2_000_001, rendered as train
images are), stands in for images nobody annotated: distillation sees only the images and a detector's
person boxes. `OUT/annotations/` then also holds
- `image_info_unlabelled.json`: images and categories, no `annotations` (as COCO's image_info_unlabeled2017);
- `detections_unlabelled.json`: COCO detection results, `[{image_id, category_id, bbox, score}]` sorted by
  image id, from a simulated person detector applied to the true people (misses, jittered boxes, scores
  that fall with IoU, false positives: see `synth_detector`);
- `person_keypoints_unlabelled_truth.json`: the split's true annotations, for analysis only (e.g. scoring
  the teacher's pseudo-labels through the detector's boxes); never train on it.
A split with 0 images writes nothing: no folder, no json.

Everything is deterministic: image `i` of split `s` draws from `np.random.default_rng([seed, s, i])`,
so an image does not depend on how many are rendered nor on the number of worker processes. The detector
draws from its own stream, `[seed, s, i, 1]`, so the images are the same whatever its settings.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kdcache import synth_figure as sf
from kdcache import synth_paint as paint
from kdcache.errors import UserError
from kdcache.keypoints import COCO_17, COCO_WHOLEBODY_133
from kdcache.synth_detector import SynthDetector
from kdcache.wholebody import WHOLEBODY_FIELDS

log = logging.getLogger(__name__)

SPLITS = (("train", 0), ("val", 1), ("unlabelled", 2))
MIN_VISIBLE_FRACTION = 0.33
MIN_LABELLED_KEYPOINTS = 5


@dataclass(frozen=True)
class SynthConfig:
    """What `kdcache synth` renders; every image is (image_wh) pixels, 1-4 people each."""

    out: Path  # dataset root; annotations/ and a folder per split with images (train/, val/, unlabelled/) inside
    train_images: int = 400  # number of train images
    val_images: int = 100  # number of val images
    unlabelled_images: int = 0  # number of unlabelled images (images and detector boxes; the truth kept apart)
    seed: int = 0  # same seed -> byte-identical files
    image_wh: tuple[int, int] = (320, 256)  # (width, height) in pixels of every image
    workers: int = 1  # processes rendering images; the output is the same for any value
    max_people: int = 4  # people per image are drawn from 1..max_people (1 = no inter-person occlusion)
    clutter: float = 1.0  # scales the number of background distractor shapes (0 = plain backgrounds)
    detector: SynthDetector = SynthDetector()  # boxes the unlabelled split's people
    keypoint_set: str = COCO_17.name  # one of SYNTH_SETS: COCO's 17, or COCO-WholeBody's 133 in its file layout


# What `kdcache synth` can label: COCO-WholeBody's people are the same (same images, boxes, body keypoints),
# with fingers, brows and lips drawn and the feet, face and hand points in COCO-WholeBody's fields.
SYNTH_SETS = (COCO_17.name, COCO_WHOLEBODY_133.name)


def image_id(split_id: int, index: int) -> int:
    """COCO image id, unique over the splits (val ids start at 1_000_001, unlabelled ones at 2_000_001)."""
    return split_id * 1_000_000 + index + 1


def synthesize(cfg: SynthConfig) -> Path:
    """Renders the splits that have images and writes their json files; returns `cfg.out`."""
    counts = {"train": cfg.train_images, "val": cfg.val_images, "unlabelled": cfg.unlabelled_images}
    if min(counts.values()) < 0:
        raise UserError("synth: image counts must be >= 0; pass --train-images/--val-images/--unlabelled-images N >= 0")
    if min(cfg.image_wh) < 64:
        raise UserError(f"synth: image size {cfg.image_wh} is too small; use at least 64x64 pixels")
    if cfg.workers < 1:
        raise UserError("synth: workers must be >= 1")
    if not 1 <= cfg.max_people <= 4 or cfg.clutter < 0:
        raise UserError("synth: --max-people must be within 1..4 and --clutter >= 0")
    if cfg.keypoint_set not in SYNTH_SETS:
        raise UserError(f"synth: cannot label the keypoint set {cfg.keypoint_set!r}; choose one of {SYNTH_SETS}")
    out = Path(cfg.out)
    pool = multiprocessing.get_context("spawn").Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        for split, split_id in SPLITS:
            count = counts[split]
            if count == 0:
                continue
            (out / "annotations").mkdir(parents=True, exist_ok=True)
            (out / split).mkdir(exist_ok=True)
            wholebody = cfg.keypoint_set == COCO_WHOLEBODY_133.name
            jobs = [(out / split, cfg.seed, split_id, i, tuple(cfg.image_wh), cfg.max_people, cfg.clutter, wholebody)
                    for i in range(count)]
            results = pool.imap(_render_to_file, jobs, chunksize=4) if pool else map(_render_to_file, jobs)
            images, annotations = [], []
            for i, (image, anns) in enumerate(results):  # in index order whatever the worker count
                images.append(image)
                annotations.extend(anns)
                if (i + 1) % max(1, count // 10) == 0 or i + 1 == count:
                    log.info("synth %s: %d/%d images, %d people", split, i + 1, count, len(annotations))
            if split == "unlabelled":
                _write_unlabelled(out / "annotations", cfg, images, annotations)
            else:
                _write_json(out / "annotations" / f"person_keypoints_{split}.json", _coco(images, annotations))
    finally:
        if pool:
            pool.close()
            pool.join()
    return out


def _render_to_file(job: tuple) -> tuple[dict, list[dict]]:
    folder, seed, split_id, index, image_wh, max_people, clutter, wholebody = job
    bgr, anns = render_image(seed, split_id, index, image_wh, max_people, clutter, wholebody)
    iid = image_id(split_id, index)
    name = f"{iid:012d}.jpg"
    if not cv2.imwrite(str(folder / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise UserError(f"synth: could not write {folder / name}; check the --out folder is writable")
    for k, ann in enumerate(anns):
        ann.update(id=iid * 100 + k + 1, image_id=iid)
    return {"id": iid, "file_name": name, "width": image_wh[0], "height": image_wh[1]}, anns


def _write_unlabelled(folder: Path, cfg: SynthConfig, images: list[dict], annotations: list[dict]) -> None:
    """The unlabelled split's image info, the detector's boxes and (for analysis only) its true annotations."""
    split_id = dict(SPLITS)["unlabelled"]
    true_boxes: dict[int, list] = {}
    for ann in annotations:
        true_boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    detections = []
    for index, image in enumerate(images):  # images are in index order
        rng = np.random.default_rng([cfg.seed, split_id, index, 1])  # not the image's stream: see the docstring
        bbox_xywh, scores = cfg.detector.detect(rng, np.array(true_boxes.get(image["id"], [])),
                                                (image["width"], image["height"]))
        detections += [{"image_id": image["id"], "category_id": 1, "bbox": [float(v) for v in bbox_xywh[k]],
                        "score": round(float(scores[k]), 3)} for k in np.argsort(-scores, kind="stable")]
    _write_json(folder / "image_info_unlabelled.json", _coco(images))
    _write_json(folder / "detections_unlabelled.json", detections)
    _write_json(folder / "person_keypoints_unlabelled_truth.json", _coco(images, annotations))


def _coco(images: list[dict], annotations: list[dict] | None = None) -> dict:
    """A COCO person-keypoints document; without annotations, an image-info one (no `annotations` key)."""
    doc = {"info": {"description": "kdcache synthetic person keypoints", "version": "1"},
           "licenses": [], "images": images}
    if annotations is not None:
        doc["annotations"] = annotations
    doc["categories"] = [COCO_17.category(1)]
    return doc


def _write_json(path: Path, doc: dict | list) -> None:
    """Writes `doc` compactly, atomically (a reader sees the old file or the whole new one)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    tmp.replace(path)


def render_image(seed: int, split_id: int, index: int, image_wh: tuple[int, int] = (320, 256),
                 max_people: int = 4, clutter: float = 1.0, wholebody: bool = False) -> tuple[np.ndarray, list[dict]]:
    """One image and its annotations (without `id`/`image_id`); `wholebody`: in COCO-WholeBody's layout, with
    the same people (the same draws) as without.

    Returns:
        bgr: uint8 [H, W, 3] (cv2 channel order).
        anns: COCO annotation dicts, far to near.
    """
    rng = np.random.default_rng([seed, split_id, index])
    w, h = image_wh
    canvas = paint.background(rng, w, h, clutter).astype(np.float32)
    counts, weights = np.arange(1, max_people + 1), np.array([0.3, 0.3, 0.2, 0.2])[:max_people]
    accepted: list[tuple[dict, dict]] = []
    while not accepted:  # every image has somebody; a lone, badly truncated person is redrawn
        people = [_place_person(rng, w, h, wholebody) for _ in range(rng.choice(counts, p=weights / weights.sum()))]
        people.sort(key=lambda p: -p["key"])  # nearest first for the occlusion test
        covered = np.zeros((h, w), bool)  # union of the masks of accepted nearer people
        for p in people:
            ann = _annotate(p, covered, w, h)
            if ann is not None:
                accepted.append((p, ann))
                covered[p["clip"]] |= p["mask"]
    for p, _ in reversed(accepted):  # painter's algorithm: far to near
        paint.composite(rng, canvas, p)
    return paint.camera(rng, canvas), [ann for _, ann in reversed(accepted)]


def _place_person(rng: np.random.Generator, w: int, h: int, wholebody: bool = False) -> dict:
    """Samples pose, size, sleeve/trouser length and position; rasterises the figure's label map.

    Returns a dict: fig, xy (keypoints [K, 2] in image px: COCO's 17, or COCO-WholeBody's 133), vis (what the
    figure itself says of each: 0 unlabelled, 1 hidden by the head, 2 seen), labels_in / mask ([h, w] label map and its
    mask, clipped to the image), clip (the image slices they cover), total (mask pixels before
    clipping) and key (depth order: larger is nearer).
    """
    pose = sf.sample_pose(rng)
    # Standing height as a fraction of the image height: small (~12 %), medium, large; large people
    # are shrunk to fit unless truncated, so their area (not their height) makes them COCO-large.
    r = rng.random()
    stature = h * (rng.uniform(0.12, 0.31) if r < 0.12 else rng.uniform(0.35, 0.86) if r < 0.55
                   else rng.uniform(0.86, 1.33))
    style = {"short_sleeves": bool(rng.random() < 0.35), "shorts": bool(rng.random() < 0.2), "wholebody": wholebody}
    fig = sf.build_figure(pose, stature, **style)
    x0, y0, x1, y1 = fig.extent()
    truncate = rng.random() < 0.2  # otherwise shrink to fit and keep the whole person in view
    fit = min(0.98 * h / (y1 - y0), 0.98 * w / (x1 - x0))
    if fit < 1 and not truncate:
        fig = sf.build_figure(pose, stature * fit, **style)
        x0, y0, x1, y1 = fig.extent()
    bw, bh = x1 - x0, y1 - y0
    slack = 0.4 if truncate else 0.0
    dx = rng.uniform(min(-slack * bw, w - bw), max(w - bw + slack * bw, 0.0)) - x0
    dy = rng.uniform(min(-0.15 * slack * bh, h - bh), max(h - bh + slack * bh, 0.0)) - y0
    rx0, ry0 = int(np.floor(x0 + dx)), int(np.floor(y0 + dy))
    rx1, ry1 = int(np.ceil(x1 + dx)) + 1, int(np.ceil(y1 + dy)) + 1
    labels = sf.draw_labels(fig, (rx0 - dx, ry0 - dy), (ry1 - ry0, rx1 - rx0))
    cx0, cy0, cx1, cy1 = max(rx0, 0), max(ry0, 0), min(rx1, w), min(ry1, h)
    clip = (slice(cy0, max(cy1, cy0)), slice(cx0, max(cx1, cx0)))
    labels_in = labels[cy0 - ry0:max(cy1, cy0) - ry0, cx0 - rx0:max(cx1, cx0) - rx0]
    xy = fig.points[:COCO_17.num_keypoints]
    vis = np.concatenate([fig.face_vis, np.full(COCO_17.num_keypoints - len(fig.face_vis), 2)])
    if wholebody:
        xy, vis = np.concatenate([xy, fig.wholebody[:, :2]]), np.concatenate([vis, fig.wholebody[:, 2]])
    return {"fig": fig, "xy": xy + (dx, dy), "vis": vis.astype(np.int64), "labels_in": labels_in,
            "mask": labels_in > 0, "clip": clip, "total": int((labels > 0).sum()),
            "key": y1 + dy + rng.normal(0, 0.05 * h)}  # lower feet = nearer, with some randomness


def _annotate(p: dict, covered: np.ndarray, w: int, h: int) -> dict | None:
    """COCO annotation of a placed person given nearer people's masks; None if too hidden."""
    mask, clip = p["mask"], p["clip"]
    visible = mask & ~covered[clip]
    if p["total"] == 0 or visible.sum() < MIN_VISIBLE_FRACTION * p["total"]:
        return None
    kps = np.zeros((len(p["xy"]), 3))
    for k, (x, y) in enumerate(p["xy"]):
        v = int(p["vis"][k])
        if v == 0 or not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            continue
        if covered[int(round(y)), int(round(x))]:
            v = 1
        kps[k] = (round(float(x), 2), round(float(y), 2), v)
    body = kps[:COCO_17.num_keypoints]
    num = int((body[:, 2] > 0).sum())
    if num < MIN_LABELLED_KEYPOINTS:
        return None
    ys, xs = np.nonzero(mask)
    bx, by = int(xs.min()) + clip[1].start, int(ys.min()) + clip[0].start
    bw, bh = int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1
    ann = {"category_id": 1, "iscrowd": 0, "bbox": [bx, by, bw, bh], "area": float(mask.sum()),
           "num_keypoints": num, "keypoints": _flat(body),
           "segmentation": [[bx, by, bx + bw, by, bx + bw, by + bh, bx, by + bh]]}
    if len(kps) > COCO_17.num_keypoints:
        ann.update(_wholebody_fields(kps))
    return ann


def _flat(kps: np.ndarray) -> list:
    """[K, 3] keypoints as a COCO file writes them: x, y floats, v ints."""
    return [float(v) if i % 3 < 2 else int(v) for i, v in enumerate(kps.ravel())]


def _wholebody_fields(kps: np.ndarray) -> dict:
    """COCO-WholeBody's part fields of a 133-point person: points, validity (any labelled), and the face and
    hand boxes (tight around the labelled points, zeros when none), as its annotation files hold them."""
    out: dict = {}
    for part, field, valid in WHOLEBODY_FIELDS:
        points = kps[COCO_WHOLEBODY_133.part(part)]
        labelled = points[points[:, 2] > 0, :2]
        out[field], out[valid] = _flat(points), bool(len(labelled))
        if part != "foot":
            box = ([float(v) for v in (*labelled.min(0), *(labelled.max(0) - labelled.min(0)))] if len(labelled)
                   else [0.0] * 4)
            out[field.replace("_kpts", "_box")] = box
    return out
