"""Compare kdcache's COCO-WholeBody metric (`kdcache.metrics.wholebody_metrics`, on pycocotools) with
xtcocotools', the library the COCO-WholeBody protocol is defined in, on the same ground truth and results.

xtcocotools is not a kdcache dependency: its PyPI wheel (1.14.3) does not import under numpy 2 ("numpy.dtype
size changed"), its sdist needs numpy at build time, and its `coco` module imports matplotlib. Install it for
this check with

    pip install cython matplotlib && pip install --no-build-isolation --no-binary xtcocotools xtcocotools

Usage:
    python scripts/check_wholebody_metric.py [--ann FILE]   # default: a synthetic whole-body val set

The results are the ground truth jittered at several noise levels, with random scores, some people missed,
some parts' scores zeroed (xtcocotools then drops the result for that part) and some false positives.
Prints each part's AP and AR from both and exits 1 when any of the ten numbers differs by more than 1e-9.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

from kdcache.coco import load_coco
from kdcache.keypoints import COCO_WHOLEBODY_133
from kdcache.metrics import METRIC_NAMES, WHOLEBODY_PARTS, wholebody_metrics
from kdcache.synth import SynthConfig, synthesize
from kdcache.wholebody import person_keypoints, split_wholebody_result

XT_TYPES = {"body": "keypoints_body", "foot": "keypoints_foot", "face": "keypoints_face",
            "left_hand": "keypoints_lefthand", "right_hand": "keypoints_righthand",
            "wholebody": "keypoints_wholebody"}


def fake_results(ann: Path, seed: int) -> list[dict]:
    """Jittered ground truth as COCO-WholeBody results (133 points joined), with misses and false positives."""
    rng = np.random.default_rng(seed)
    coco = load_coco(ann)
    results = []
    for a in coco.dataset["annotations"]:
        if rng.random() < 0.1:
            continue  # missed
        k = np.asarray(person_keypoints(a, wholebody=True, honour_valid=False), float).reshape(-1, 3)
        scale = np.sqrt(max(a["area"], 1.0)) * rng.choice([0.005, 0.02, 0.06, 0.15])
        k[:, :2] += rng.normal(0, scale, (len(k), 2))
        k[:, 2] = rng.uniform(0.05, 1.0, len(k))
        for part in WHOLEBODY_PARTS[1:]:
            if rng.random() < 0.1:
                k[COCO_WHOLEBODY_133.part(part), 2] = 0.0  # a part with no positive score
        results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "keypoints": [float(v) for v in k.ravel()], "score": float(rng.uniform(0.1, 1))})
        if rng.random() < 0.1:  # a false positive beside it
            fp = dict(results[-1], keypoints=[float(v) for v in (k + (40, 10, 0)).ravel()],
                      score=float(rng.uniform(0.05, 0.5)))
            results.append(fp)
    return results


def xtcocotools_metrics(ann: Path, results: list[dict]) -> dict[str, float | None]:
    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval

    sigmas = np.asarray(COCO_WHOLEBODY_133.oks_sigmas)
    out: dict[str, float | None] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        dt = gt.loadRes([split_wholebody_result(r) for r in copy.deepcopy(results)])
        for part, iou_type in XT_TYPES.items():
            span = range(133) if part == "wholebody" else COCO_WHOLEBODY_133.part(part)
            ev = COCOeval(gt, dt, iou_type, sigmas[span.start:span.stop], use_area=True)
            ev.params.useSegm = None
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            prefix = "" if part == "wholebody" else f"{part} "
            out.update({prefix + name: (float(v) * 100 if v >= 0 else None) for name, v in zip(METRIC_NAMES, ev.stats)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ann", type=Path, help="a COCO-WholeBody annotation file (default: synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ann = args.ann
        if ann is None:
            synthesize(SynthConfig(out=Path(tmp), train_images=0, val_images=60, keypoint_set=COCO_WHOLEBODY_133.name))
            ann = Path(tmp) / "annotations/person_keypoints_val.json"
        results = fake_results(ann, args.seed)
        ours = wholebody_metrics(load_coco(ann), results, COCO_WHOLEBODY_133)
        theirs = xtcocotools_metrics(ann, results)
    worst = 0.0
    print(f"{'part':11s} {'kdcache AP':>10s} {'xtcoco AP':>10s} {'kdcache AR':>10s} {'xtcoco AR':>10s}")
    for part in (*WHOLEBODY_PARTS, "wholebody"):
        prefix = "" if part == "wholebody" else f"{part} "
        print(f"{part:11s} {ours[prefix + 'AP']:10.4f} {theirs[prefix + 'AP']:10.4f} "
              f"{ours[prefix + 'AR']:10.4f} {theirs[prefix + 'AR']:10.4f}")
        for name in METRIC_NAMES:
            a, b = ours[prefix + name], theirs[prefix + name]
            worst = max(worst, 0.0 if a is None and b is None else abs(a - b) if None not in (a, b) else np.inf)
    print(f"largest difference over the 6 x {len(METRIC_NAMES)} numbers: {worst:.2e}")
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
