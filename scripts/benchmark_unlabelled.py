"""The unlabelled arm of the benchmark: what do people nobody annotated add, distilled from a cache?

    python scripts/benchmark_unlabelled.py                    # regime l500: docs/benchmark_unlabelled.{md,json}
    python scripts/benchmark_unlabelled.py --regime t1000     # regime t1000: docs/benchmark_unlabelled_t1000.{md,json}

The semi-supervised regime (issue 13): a labelled set L, an unlabelled pool U five times larger (images and a
detector's boxes only), one teacher trained on L (alone, or with more people: t1000). The same small student
is then trained, for the same number of optimiser steps in every arm (so that no arm wins by training longer),
with several seeds:

    gt-L            ground truth of L only
    kd-L            distilled from the cache of L (teacher heatmaps + ground truth)
    kd-LU           distilled from the caches of L and U (`--cache L --cache U`; ground truth on L's rows only)
    kd-LU-1to1      kd-LU with U at `--cache-weight 0.2`: about as many U people as L people per epoch
    kd-LU-conf      kd-LU with `--confidence-weights` (each joint's teacher term times the teacher's peak)
    kd-LU-box       kd-LU with `--box-score-weights` (each row's teacher term times its detector score)
    gt-L-x2, kd-L-x2, kd-LU-1to1-x2
                    the same at twice the steps: kd-LU-1to1-x2 sees L's people as often as gt-L does and U's on
                    top, so U is tested on a student that has the steps to fit it (at equal steps a student
                    that draws U sees L less often), against ground truth and L-only distillation given as long

Every run is also scored on L's own people (`eval on L`): far above its validation AP, the student overfits L
and more people can help it; near it, the student underfits and only more steps can.

U's boxes come from `kdcache synth --unlabelled-images`: the true people's boxes jittered, some missed, false
positives on the background, with scores; U's own keypoints exist only in a truth file that only the teacher's
pseudo-label check below reads. Every stage runs once and is skipped when done (`OUT/state.json`); a training
run killed mid-way resumes from its last complete epoch, so the study can be stopped and run again at any
moment. `--report-only` writes the report from whatever has finished.

Two regimes (`--regime`), each with its own folder and report:

    l500    L = 500 people, U = 2500 images, 1500 steps, every arm above; the teacher learns from L alone
    t1000   the same L, U and students (its synth makes l500's people first), the -x2 arms only; the teacher learns
            from 1000 people, L and 500 the students never get: a teacher that knows more than the students'
            labels, as a released teacher trained on more data than its users' does
    t1000-x3  t1000's recipe in its own folder (its teacher retrained), gt-L and kd-LU-1to1 at three times the
            steps, two seeds: a probe of t1000's reading that its student lacks room
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import (JITTER, Stages, data_and_teacher, open_study, run_config, study_main,  # noqa: E402
                       train_seconds, val_curve)
from benchmark_report import aps, diff_se, fmt, fmt_diff  # noqa: E402
from kdcache.cache import open_cache  # noqa: E402
from kdcache.config import DumpConfig, EvalConfig, OptimConfig, RunConfig, TrainStudentConfig, to_jsonable  # noqa: E402
from kdcache.demo import DEMO_AUG  # noqa: E402
from kdcache.dump import dump_teacher  # noqa: E402
from kdcache.evaluate import evaluate  # noqa: E402
from kdcache.inspect_cache import cache_summary  # noqa: E402
from kdcache.losses import KDConfig  # noqa: E402
from kdcache.predict import PredictConfig  # noqa: E402
from kdcache.student import StudentConfig  # noqa: E402
from kdcache.synth import SynthConfig, synthesize  # noqa: E402
from kdcache.train import train_student  # noqa: E402
from kdcache.transforms import keypoints_to_crop  # noqa: E402

log = logging.getLogger("benchmark_unlabelled")


@dataclass(frozen=True)
class UnlabelledConfig:
    out: Path
    report: Path = Path("docs/benchmark_unlabelled.md")
    labelled_images: int = 500            # L: one person per image
    unlabelled_images: int = 2500         # U: 5 x L images, boxes from the synthetic detector
    val_images: int = 500
    max_people: int = 1                   # the main study's synthetic set (docs/benchmark.md)
    clutter: float = 0.3
    input_hw: tuple[int, int] = (128, 96)
    teacher_arch: str = "vitpose-tiny"
    teacher_images: int = 0               # > labelled_images: the teacher also learns from people L lacks
    ground_truth_from: str = ""           # a regime whose ground-truth arms this one shares (same L, val, seeds)
    teacher_epochs: int = 200
    student: str = "mobilenetv3_small_050"
    student_head_channels: int = 64
    steps: int = 1500                     # optimiser steps of every arm (about 16 epochs over L + U)
    box_score_thr: float = 0.5            # U's boxes kept for the dump, as a user would keep a detector's
    labelled_views: int = 32              # K of L's cache (its arms replay each view ~3 times)
    unlabelled_views: int = 10            # K of U's cache (each U person is drawn ~8 times in the run)
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha: float = 0.5
    batch_size: int = 32
    lr: float = 2e-3
    workers: int = 2
    cache_workers: int = 0
    seed: int = 0
    regime: str = "l500"
    arms: tuple[str, ...] = ()            # names of the arms to run (() = every arm)


# Each regime's settings over the defaults above, its folder and its report.
REGIMES: dict[str, dict[str, Any]] = {
    "l500": dict(out="bench_unlabelled", report="docs/benchmark_unlabelled.md",
                 arms=("gt-L", "kd-L", "kd-LU", "kd-LU-1to1", "kd-LU-conf", "kd-LU-box", "gt-L-x2", "kd-LU-1to1-x2",
                       "kd-L-x2")),
    "t1000": dict(out="bench_unlabelled_t1000", report="docs/benchmark_unlabelled_t1000.md", teacher_images=1000,
                  arms=("kd-LU-1to1-x2", "kd-L-x2"), ground_truth_from="l500"),
    # t1000's recipe retrained, and a probe of its reading (the student lacks room): three times the steps.
    "t1000-x3": dict(out="bench_unlabelled_t1000_x3", report="docs/benchmark_unlabelled_t1000_x3.md",
                     teacher_images=1000, arms=("gt-L-x3", "kd-LU-1to1-x3"), seeds=(0, 1)),
}


def regime_config(regime: str, out: Path | None = None, report: Path | None = None) -> "UnlabelledConfig":
    settings = dict(REGIMES[regime])
    default_out, default_report = Path(settings.pop("out")), Path(settings.pop("report"))
    return UnlabelledConfig(out=out or default_out, report=report or default_report, regime=regime, **settings)


@dataclass(frozen=True)
class Arm:
    name: str
    caches: tuple[str, ...] = ()          # cache folders under OUT; () = ground truth of L
    weights: tuple[float, ...] = ()       # --cache-weight of each cache (() = 1 each)
    confidence_weights: bool = False
    box_score_weights: bool = False
    steps_factor: int = 1                 # optimiser steps: this times the regime's steps
    what: str = ""


ARMS = (
    Arm("gt-L", what="ground truth of L only"),
    Arm("kd-L", ("cache-L",), what="distilled on L"),
    Arm("kd-LU", ("cache-L", "cache-U"), what="distilled on L + U"),
    Arm("kd-LU-1to1", ("cache-L", "cache-U"), weights=(1.0, 0.2),
        what="L + U, U at weight 0.2 (about as many U as L people per epoch)"),
    Arm("kd-LU-conf", ("cache-L", "cache-U"), confidence_weights=True, what="L + U, confidence weights"),
    Arm("kd-LU-box", ("cache-L", "cache-U"), box_score_weights=True, what="L + U, box-score weights"),
    Arm("gt-L-x2", steps_factor=2, what="gt-L at twice the steps"),
    Arm("kd-LU-1to1-x2", ("cache-L", "cache-U"), weights=(1.0, 0.2), steps_factor=2,
        what="kd-LU-1to1 at twice the steps (L's people as often as in gt-L, U's on top)"),
    Arm("kd-L-x2", ("cache-L",), steps_factor=2, what="kd-L at twice the steps"),
    Arm("gt-L-x3", steps_factor=3, what="gt-L at three times the steps"),
    Arm("kd-LU-1to1-x3", ("cache-L", "cache-U"), weights=(1.0, 0.2), steps_factor=3,
        what="kd-LU-1to1 at three times the steps"),
)


def run_study(cfg: UnlabelledConfig, stop_after: str | None = None) -> Stages:
    out = Path(cfg.out)
    stages, data, teacher_ann, val_ann, teacher = open_study(out)
    data_u = out / "data_u"
    predict = PredictConfig(workers=cfg.workers)

    def run(name: str, seed: int = cfg.seed, workers: int = cfg.workers) -> RunConfig:
        return run_config(out, name, seed, workers)

    arms = [arm for arm in ARMS if not cfg.arms or arm.name in cfg.arms]
    # The teacher learns from L alone, or (teacher_images) from L and more people the students never get.
    data_and_teacher(stages, out, cfg, max(cfg.teacher_images, cfg.labelled_images), val_every=20)
    train_ann = teacher_ann
    if cfg.teacher_images > cfg.labelled_images:
        train_ann = data / "annotations/person_keypoints_train_L.json"
        stages.run("L", lambda: str(first_images(teacher_ann, train_ann, cfg.labelled_images)))
    if cfg.ground_truth_from:
        # Its ground-truth arms are the other regime's runs: they never see a teacher, so they are the same runs
        # when the students' people and validation are the same files, which this checks.
        theirs = out.parent / REGIMES[cfg.ground_truth_from]["out"] / "data"  # the other study's folder, beside
        stages.run(f"same people as {cfg.ground_truth_from}", lambda: same_people(
            (data, train_ann), (theirs, theirs / "annotations/person_keypoints_train.json")))
    stages.run("eval teacher", lambda: evaluate(EvalConfig(model=teacher, ann=val_ann, images=data / "val",
                                                           predict=predict)))
    stages.run("eval teacher on L", lambda: evaluate(EvalConfig(model=teacher, ann=train_ann, images=data / "train",
                                                                predict=predict)))
    if stop_after == "teacher":
        return stages
    stages.run("synth U", lambda: str(synthesize(SynthConfig(
        out=data_u, train_images=0, val_images=0, unlabelled_images=cfg.unlabelled_images, seed=cfg.seed,
        max_people=cfg.max_people, clutter=cfg.clutter, workers=max(1, cfg.workers)))))
    u_info = data_u / "annotations/image_info_unlabelled.json"
    u_dets = data_u / "annotations/detections_unlabelled.json"
    # The teacher's pseudo-labels on U, scored against U's hidden truth through the detector's boxes.
    stages.run("eval teacher on U", lambda: evaluate(EvalConfig(
        model=teacher, ann=data_u / "annotations/person_keypoints_unlabelled_truth.json", images=data_u / "unlabelled",
        boxes=u_dets, box_score_thr=cfg.box_score_thr, predict=predict)))
    stages.run("dump cache-L", lambda: str(dump_teacher(DumpConfig(
        teacher=teacher, ann=train_ann, images=data / "train", run=run("cache-L"), views=cfg.labelled_views + 1,
        aug=DEMO_AUG))))
    stages.run("dump cache-U", lambda: str(dump_teacher(DumpConfig(
        teacher=teacher, ann=u_info, boxes=u_dets, box_score_thr=cfg.box_score_thr, images=data_u / "unlabelled",
        run=run("cache-U"),
        views=cfg.unlabelled_views + 1, aug=DEMO_AUG))))
    for name in ("cache-L", "cache-U"):
        stages.run(f"size {name}", lambda name=name: cache_summary(out / name))
    # How far the cached targets are from the truth: L's people against their ground truth (the teacher was
    # trained on them), U's against the hidden truth (people the teacher never saw, cut by the detector's boxes).
    stages.run("target error cache-L", lambda: target_error(out / "cache-L"))
    stages.run("target error cache-U", lambda: target_error(
        out / "cache-U", data_u / "annotations/person_keypoints_unlabelled_truth.json"))
    if stop_after == "dump":
        return stages

    student = StudentConfig(backbone=cfg.student, input_hw=cfg.input_hw, head_channels=cfg.student_head_channels)
    # The arms of the goal first, seed-major (a partial study has them at the first seeds), then the weightings.
    for seed, arm in [(seed, arm) for group in (arms[:3], arms[3:]) for seed in cfg.seeds for arm in group]:
        name = f"runs/{arm.name}-s{seed}"
        # Every arm: exactly its steps (the epochs bound never binds first), cosine over them.
        steps = cfg.steps * arm.steps_factor
        optim = OptimConfig(epochs=steps, max_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=100)
        kd = KDConfig(alpha=cfg.alpha if arm.caches else 0.0, confidence_weights=arm.confidence_weights,
                      box_score_weights=arm.box_score_weights)
        if arm.caches:
            source = dict(caches=tuple(out / c for c in arm.caches), cache_weights=arm.weights,
                          run=run(name, seed, cfg.cache_workers),
                          student_aug=JITTER)  # train-student's default where cached views are replayed
        else:
            source = dict(ann=train_ann, images=data / "train", run=run(name, seed))
        stages.run(f"train {name}", lambda source=source, optim=optim, kd=kd: str(train_student(
            TrainStudentConfig(student=student, aug=DEMO_AUG, optim=optim, kd=kd, **source))))
        stages.run(f"eval {name}", lambda name=name: evaluate(EvalConfig(
            model=out / name / "last.pt", ann=val_ann, images=data / "val", predict=predict)))
        # The run on the people it learnt from: overfitting (far above validation) or underfitting (near it).
        stages.run(f"eval on L {name}", lambda name=name: evaluate(EvalConfig(
            model=out / name / "last.pt", ann=train_ann, images=data / "train", predict=predict)))
    return stages


def same_people(mine: tuple[Path, Path], theirs: tuple[Path, Path]) -> dict[str, Any]:
    """Whether two studies' students learn from and are scored on the same people: each (data folder, students'
    annotation file) pair's L annotations, validation file and image bytes compared. Refused if they differ."""
    def fingerprint(data: Path, train_ann: Path) -> list[Any]:
        coco = json.loads(train_ann.read_text())
        files = [data / "train" / image["file_name"] for image in coco["images"]]
        val = data / "annotations/person_keypoints_val.json"
        files += [data / "val" / image["file_name"] for image in json.loads(val.read_text())["images"]]
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.read_bytes())
        return [coco["images"], coco["annotations"], val.read_bytes(), digest.hexdigest()]

    if not theirs[1].exists():
        raise SystemExit(f"{theirs[1]} is missing: run that regime first; this one borrows its ground-truth arms")
    if fingerprint(*mine) != fingerprint(*theirs):
        raise SystemExit(f"{mine[1]} and {theirs[1]}'s people or images differ: their ground-truth arms are not shared")
    return {"identical": True}


def first_images(ann: Path, out: Path, count: int) -> Path:
    """`ann` cut to its first `count` images (by id) and their annotations: the students' L within the teacher's."""
    coco = json.loads(Path(ann).read_text())
    images = sorted(coco["images"], key=lambda image: image["id"])[:count]
    keep = {image["id"] for image in images}
    out.write_text(json.dumps({**coco, "images": images,
                               "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}))
    return out


def target_error(cache_dir: Path, truth: Path | None = None, rows: int = 400, seed: int = 0) -> dict[str, float]:
    """Distance between the cached teacher heatmaps' peaks and the true joints, in crop pixels, over `rows`
    random rows: median over rows of each row's mean over its labelled joints inside the crop, and the share of
    rows under 2 heatmap pixels. The truth is each row's ground truth, or (`truth`, one person per image) the
    person of its image in that file, projected with the row's affine."""
    cache = open_cache(cache_dir)
    people = {}
    if truth is not None:
        for ann in json.loads(Path(truth).read_text())["annotations"]:
            people.setdefault(ann["image_id"], []).append(ann)
    stride, (h, w) = max(cache.codec.stride), cache.input_hw
    errors = []
    for index in np.random.default_rng(seed).choice(len(cache), min(rows, len(cache)), replace=False):
        row = cache[int(index)]
        if truth is None:
            joints = row["keypoints"]
        elif len(people.get(row["image_id"], [])) == 1:
            image_joints = np.asarray(people[row["image_id"]][0]["keypoints"], np.float32).reshape(-1, 3)
            joints = keypoints_to_crop(image_joints, row["affine"], row["flip"], cache.keypoint_set.flip_index)
        else:
            continue
        heat = row["heatmaps"]
        peak = heat.reshape(len(heat), -1).argmax(axis=1)
        pred = cache.codec.heatmap_to_crop(np.stack([peak % heat.shape[2], peak // heat.shape[2]], axis=1))
        inside = (joints[:, 2] > 0) & (joints[:, 0] >= 0) & (joints[:, 0] < w) & (joints[:, 1] >= 0) & (joints[:, 1] < h)
        if inside.any():
            errors.append(float(np.linalg.norm(pred[inside] - joints[inside, :2], axis=1).mean()))
    errors = np.array(errors)
    return {"rows": len(errors), "median_px": float(np.median(errors)),
            "share_within_2_heatmap_px": float(np.mean(errors < 2 * stride))}


def collect(cfg: UnlabelledConfig, stages: Stages) -> dict[str, Any]:
    out = Path(cfg.out)
    result = lambda name: stages.state.get(name, {}).get("result") if stages.done(name) else None  # noqa: E731
    runs = []
    if cfg.ground_truth_from and stages.done(f"same people as {cfg.ground_truth_from}"):
        other = json.loads(Path(regime_config(cfg.ground_truth_from).report).with_suffix(".json").read_text())
        runs += [dict(run, what=f"{run['what']} ({cfg.ground_truth_from}'s runs: the same people, seeds and steps)",
                      borrowed_from=cfg.ground_truth_from)
                 for run in other["runs"] if run["name"] in ("gt-L", "gt-L-x2")]
    for seed in cfg.seeds:
        for arm in ARMS:
            name = f"runs/{arm.name}-s{seed}"
            metrics = result(f"eval {name}")
            if metrics is None:
                continue
            on_l = result(f"eval on L {name}")
            runs.append({"name": arm.name, "what": arm.what, "seed": seed, "caches": list(arm.caches),
                         "steps": cfg.steps * arm.steps_factor,
                         "AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"], "AR": metrics["AR"],
                         "AP_on_L": None if on_l is None else on_l["AP"],
                         "train_seconds": round(train_seconds(out / name), 1)})
    teacher = result("eval teacher")
    metrics = out / "teacher/metrics.csv"
    in_training = None if teacher is not None or not metrics.exists() else val_curve(out / "teacher")
    return {"config": to_jsonable(cfg), "steps": cfg.steps, "teacher_in_training": in_training,
            "planned_runs": len(cfg.seeds) * len([a for a in ARMS if not cfg.arms or a.name in cfg.arms]),
            "teacher": None if teacher is None else {
                "AP": teacher["AP"], "train_seconds": round(train_seconds(out / "teacher"), 1),
                "val_curve": val_curve(out / "teacher")},
            "teacher_on_U": result("eval teacher on U"), "teacher_on_L": result("eval teacher on L"),
            "dumps": {name: {"seconds": round(stages.seconds(f"dump {name}"), 1), **result(f"size {name}"),
                             "target_error": result(f"target error {name}")}
                      for name in ("cache-L", "cache-U") if stages.done(f"size {name}")},
            "runs": runs,
            "study_seconds": round(sum(entry["seconds"] for entry in stages.state.values()), 1)}


def write_report(cfg: UnlabelledConfig, results: dict[str, Any]) -> None:
    """docs/benchmark_unlabelled.md from `results` (written beside it as JSON; the report is recomputed from it)."""
    report = Path(cfg.report)
    report.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    arms: dict[str, list[dict[str, Any]]] = {}
    for run in results["runs"]:
        arms.setdefault(run["name"], []).append(run)
    ap = {name: aps(runs) for name, runs in arms.items()}
    on_l = {name: [r["AP_on_L"] for r in runs if r.get("AP_on_L") is not None] for name, runs in arms.items()}
    c, teacher, steps_ = results["config"], results["teacher"], results["steps"]
    others = ", ".join(f"[{name}]({Path(REGIMES[name]['report']).name})" for name in REGIMES if name != cfg.regime)
    lines = [f"# Benchmark: what people nobody annotated add (the unlabelled arm, regime {cfg.regime})", "",
             f"Made by `python scripts/benchmark_unlabelled.py --regime {cfg.regime}` (resumable; every number here "
             f"is recomputed from [`{report.with_suffix('.json').name}`]({report.with_suffix('.json').name})). "
             f"Other regimes: {others}. The main study is "
             "[benchmark.md](benchmark.md); this arm uses its synthetic people, crop size, student and recipe.", "",
             "## Regime", "",
             f"- **Labelled set L**: `kdcache synth`, {c['labelled_images']} images with one person each, clutter "
             f"{c['clutter']}; validation: {c['val_images']} more. Crops {c['input_hw'][0]}x{c['input_hw'][1]}.",
             f"- **Unlabelled pool U**: {c['unlabelled_images']} more images ({c['unlabelled_images'] // max(1, c['labelled_images'])}"
             "x L) from `kdcache synth --unlabelled-images`: no keypoints, only a simulated person detector's boxes "
             "(jittered, some people missed, false positives on the background, scores), dumped with "
             "`dump-teacher --ann image_info_unlabelled.json --boxes detections_unlabelled.json --box-score-thr "
             f"{c['box_score_thr']}`.",
             f"- **Teacher**: `{c['teacher_arch']}` trained {c['teacher_epochs']} epochs on "
             + ("L only" if c.get("teacher_images", 0) <= c["labelled_images"] else
                f"{c['teacher_images']} labelled people: L and {c['teacher_images'] - c['labelled_images']} more that "
                "the students never get, so that it knows more than their labels, as a released teacher trained on "
                "more data than yours does")
             + ("" if teacher is None else f": **{teacher['AP']:.1f} AP** on validation")
             + ("" if not results.get("teacher_on_L") else f", {results['teacher_on_L']['AP']:.1f} on L's own people")
             + "."]
    done, planned = len([r for r in results["runs"] if not r.get("borrowed_from")]), results.get("planned_runs")
    if planned and done < planned:
        curve = results.get("teacher_in_training")
        lines.append(f"- **In progress**: {done} of {planned} runs finished" + (
            f"; the teacher is training (validation AP by epoch so far: "
            f"{', '.join(f'{e}: {ap:.1f}' for e, ap in curve)})" if curve else "") +
            f". Resume with `python scripts/benchmark_unlabelled.py --regime {cfg.regime}` on the study's own folder "
            "(its teacher and caches); in a new folder the study starts over with a retrained teacher, which need "
            "not be bit-identical, so its runs do not mix with these.")
    if results.get("teacher_on_U"):
        lines.append(f"- **Its pseudo-labels on U**, scored against U's hidden truth through the detector's boxes: "
                     f"{results['teacher_on_U']['AP']:.1f} AP (AP50 {results['teacher_on_U']['AP50']:.1f}).")
    for name, dump in results["dumps"].items():
        error = dump.get("target_error")
        lines.append(f"- **{name}**: {dump['views']} views ({dump['views_per_instance']} per person, view 0 "
                     f"plain), {dump['kb_per_view']:.1f} KB per view, dumped in {dump['seconds']:.0f} s" +
                     ("." if not error else f"; its teacher heatmaps' peaks lie a median {error['median_px']:.1f} "
                      f"crop pixels from the true joints ({error['share_within_2_heatmap_px']:.0%} of rows within 2 "
                      f"heatmap pixels; {error['rows']} rows against "
                      f"{'their ground truth' if name == 'cache-L' else 'the hidden truth'})."))
    people = {name: dump["instances"] for name, dump in results["dumps"].items()}
    epochs = "" if len(people) < 2 else (
        f" = {steps_ * c['batch_size'] / sum(people.values()):.1f} epochs over L + U's {sum(people.values())} people "
        f"at batch {c['batch_size']}, {steps_ * c['batch_size'] / people['cache-L']:.0f} epochs over L alone")
    factors = sorted({a.steps_factor for a in ARMS if (not cfg.arms or a.name in cfg.arms) and a.steps_factor > 1})
    x2 = "" if not factors else " (but " + ", ".join(f"the -x{f} arms, which take {f * steps_}" for f in factors) + ")"
    lines += [f"- **Student**: `{c['student']}` (head {c['student_head_channels']} channels), from scratch, "
              f"**{steps_} optimiser steps in every arm** ({epochs.lstrip(' =') or 'as many in each'}), so that "
              f"no arm wins by training longer{x2}; AdamW lr {c['lr']}, "
              f"cosine; KD α = {c['alpha']} (teacher MSE) + (1 − α) ground-truth MSE, the latter on rows with ground "
              "truth only; cached arms mirror at random and jitter (0.5, train-student's default when views are "
              "replayed), the ground-truth arm draws a fresh view every epoch. Seeds " + ", ".join(map(str, c["seeds"])) + " per arm.",
              "- **AP**: COCO keypoint AP on the validation people, ground-truth boxes, no flip test, last weights; "
              "mean ± sample std over seeds; a difference marked * exceeds twice its standard error (Welch). "
              "**AP on L**: the same on L's own people, which the student learnt from: far above AP, it overfits "
              "L; near AP, it underfits.", "",
              "## Arms", "",
              "| arm | what | AP | AP50 | AP on L | vs gt-L (as many steps) | vs kd-L (as many steps) | training s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        if arm.name not in ap:
            continue
        runs = arms[arm.name]
        suffix = f"-x{arm.steps_factor}" if arm.steps_factor > 1 else ""
        vs = lambda ref: (fmt_diff(ap[arm.name], ap[ref + suffix])  # noqa: E731
                          if ref + suffix in ap and ref + suffix != arm.name else "")
        lines.append(f"| {arm.name} | {arm.what} | {fmt(ap[arm.name])} (n={len(runs)}) | "
                     f"{fmt([r['AP50'] for r in runs])} | {fmt(on_l[arm.name]) if on_l[arm.name] else ''} | "
                     f"{vs('gt-L')} | {vs('kd-L')} | "
                     f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} |")
    lines += ["", "## What U adds", ""] + what_u_adds(results, ap, on_l, people)
    lines += ["", f"Wall time of the arm so far: {results['study_seconds'] / 3600:.1f} h of compute on this "
              "project's 2-core CPU (stage times summed over its sittings)."]
    report.write_text("\n".join(lines) + "\n")


def what_u_adds(results: dict[str, Any], ap: dict[str, list[float]], on_l: dict[str, list[float]],
                people: dict[str, int]) -> list[str]:
    """The report's findings, in the order they explain each other: the goal, what distillation and U add at
    equal steps, why, and what twice the steps and the teacher's edge change."""
    lines: list[str] = []
    mean = statistics.fmean
    teacher, steps_ = results["teacher"], results["steps"]
    if {"gt-L", "kd-LU"} <= set(ap):
        d, _ = diff_se(ap["kd-LU"], ap["gt-L"])
        lines.append(f"- **Goal: L + U at least 2 AP above ground truth alone**: {fmt_diff(ap['kd-LU'], ap['gt-L'])} "
                     f"AP: **{'met' if d >= 2 else 'not met'}**.")
    if {"kd-L", "kd-LU"} <= set(ap):
        lines.append(f"- **U over L-only distillation** (same steps, same teacher): "
                     f"{fmt_diff(ap['kd-LU'], ap['kd-L'])} AP.")
    if {"kd-L", "gt-L"} <= set(ap):
        lines.append(f"- **Distillation on L alone** over its ground truth: {fmt_diff(ap['kd-L'], ap['gt-L'])} AP.")
    errors = {name: (dump.get("target_error") or {}).get("median_px") for name, dump in results["dumps"].items()}
    if {"kd-L", "kd-LU", "gt-L"} <= set(ap) and None not in (errors.get("cache-L"), errors.get("cache-U")) and teacher:
        u_share = people["cache-U"] / sum(people.values())
        lines.append(
            f"- **Why U {'helps' if mean(ap['kd-LU']) > mean(ap['kd-L']) else 'does not help'} here**: the "
            f"teacher's targets on U's people lie a median {errors['cache-U']:.1f} crop pixels from the truth, "
            f"{errors['cache-U'] / errors['cache-L']:.1f}x farther than on L's people, which it was trained on "
            f"({errors['cache-L']:.1f}): on people it never saw it is a {teacher['AP']:.1f}-AP model, "
            f"{teacher['AP'] - mean(ap['gt-L']):.1f} AP above what the student reaches on L's ground truth in "
            f"{steps_} steps. With U's people {u_share:.0%} of the draws, the student sees L's people "
            f"{1 / (1 - u_share):.0f}x less often and these noisier targets instead.")
    if on_l.get("gt-L") and on_l.get("kd-LU"):
        gt_l, gt_val, lu_l, lu_val = mean(on_l["gt-L"]), mean(ap["gt-L"]), mean(on_l["kd-LU"]), mean(ap["kd-LU"])
        lines.append(f"- **Over- or underfitting**: the ground-truth student scores {gt_l:.1f} AP on L's own people "
                     f"against {gt_val:.1f} on validation ({'it overfits L' if gt_l - gt_val > 2 else 'no overfitting'}"
                     f"); the L + U student {lu_l:.1f} against {lu_val:.1f}"
                     + (": it fits L's people far less well in its steps than the ground-truth student does, so "
                        "what it lacks first is steps" if gt_l - lu_l > 2 else "") + ".")
    if {"kd-LU-1to1", "kd-L", "gt-L"} <= set(ap):
        lines.append(f"- **Balanced draws** (U at `--cache-weight 0.2`, about as many U as L people per epoch): "
                     f"{fmt_diff(ap['kd-LU-1to1'], ap['kd-L'])} AP against L-only distillation, "
                     f"{fmt_diff(ap['kd-LU-1to1'], ap['gt-L'])} against ground truth alone.")
    # The goal at twice the steps: balanced L + U against the better ground-truth arm (a user trains that one as
    # long as it gains).
    best_gt = (max(("gt-L", "gt-L-x2"), key=lambda name: mean(ap[name]))
               if {"kd-LU-1to1-x2", "gt-L-x2", "gt-L"} <= set(ap) else None)
    gain = None if best_gt is None else diff_se(ap["kd-LU-1to1-x2"], ap[best_gt])[0]
    if best_gt is not None:
        lines.append(f"- **Twice the steps** ({2 * steps_}): ground truth alone gains "
                     f"{fmt_diff(ap['gt-L-x2'], ap['gt-L'])} AP from them. Balanced L + U at twice the steps (L's "
                     f"people drawn as often as in gt-L, U's on top): {fmt_diff(ap['kd-LU-1to1-x2'], ap[best_gt])} "
                     f"AP against the better ground-truth arm ({best_gt}): the goal is "
                     f"**{'met' if gain >= 2 else 'not met'}** at twice the steps"
                     + (f"; {fmt_diff(ap['kd-LU-1to1-x2'], ap['kd-L-x2'])} AP against L-only distillation at as "
                        "many steps." if "kd-L-x2" in ap else "."))
    if "gt-L-x2" in ap and teacher:
        edge = teacher["AP"] - mean(ap["gt-L-x2"])
        line = (f"- **The teacher's edge**: the teacher scores {teacher['AP']:.1f} AP on validation, {edge:+.1f} "
                f"against the ground-truth student at twice the steps ({fmt(ap['gt-L-x2'])}). ")
        if edge < 2:
            line += ("Distillation passes on what a teacher knows beyond the labels, and a teacher that learnt from L "
                     "alone, from scratch, knows little more than a student given the steps to learn from L too: "
                     "the people it labels in U carry that little. Released teachers have their edge from beyond the "
                     "labels (MAE pretraining on millions of images, tens of times the student's size; ViTPose-B "
                     "scores 75.8 AP on COCO).")
        elif gain is not None and on_l.get("kd-LU-1to1-x2") and on_l.get("gt-L-x2"):
            on_u = (results.get("teacher_on_U") or {}).get("AP")
            line += ((f"Its pseudo-labels on U score {on_u:.1f} AP through the detector's boxes. " if on_u else "")
                     + f"The L + U student turns {'much' if gain >= 2 else 'little'} of the edge into accuracy "
                     f"({gain:+.1f} AP against the better ground-truth arm). It scores "
                     f"{mean(on_l['kd-LU-1to1-x2']):.1f} AP on L's own people, where the ground-truth student scores "
                     f"{mean(on_l['gt-L-x2']):.1f}: "
                     + ("in its steps it fits its targets far less well than the ground-truth student fits its "
                        "labels, which points at the student's room (size, steps) rather than its targets." if gain < 2
                        else "it has the room to learn from them."))
        lines.append(line + " Before dumping U, measure both: the teacher's AP on people it never saw (its validation "
                     "AP; through your detector's boxes, `kdcache eval --boxes`) against the student's on ground "
                     "truth trained as long as that still gains.")
    if {"gt-L-x3", "kd-LU-1to1-x3"} <= set(ap):
        gain3, _ = diff_se(ap["kd-LU-1to1-x3"], ap["gt-L-x3"])
        edge = "" if not teacher else (f" (the teacher: {teacher['AP']:.1f} AP, "
                                       f"{teacher['AP'] - mean(ap['gt-L-x3']):+.1f})")
        lines.append(f"- **Three times the steps** ({3 * steps_}): ground truth alone {fmt(ap['gt-L-x3'])} AP"
                     f"{edge}, balanced L + U {fmt(ap['kd-LU-1to1-x3'])}: "
                     f"{fmt_diff(ap['kd-LU-1to1-x3'], ap['gt-L-x3'])} AP, the goal **{'met' if gain3 >= 2 else 'not met'}** at three times the steps"
                     + (" (one seed on a side: its noise is not measured)"
                        if min(len(ap["gt-L-x3"]), len(ap["kd-LU-1to1-x3"])) < 2 else "")
                     + (f"; on L's own people {mean(on_l['kd-LU-1to1-x3']):.1f} against {mean(on_l['gt-L-x3']):.1f}"
                        if on_l.get("kd-LU-1to1-x3") and on_l.get("gt-L-x3") else "") + ".")
    for name, what in (("kd-LU-conf", "confidence weights (`--confidence-weights`)"),
                       ("kd-LU-box", "box-score weights (`--box-score-weights`)")):
        if {name, "kd-LU"} <= set(ap):
            lines.append(f"- **Down-weighting doubtful pseudo-labels by {what}**: {fmt_diff(ap[name], ap['kd-LU'])} "
                         "AP against plain L + U.")
    return lines


def main() -> None:
    study_main(__doc__, lambda a: regime_config(a.regime, a.out, a.report), run_study, collect, write_report,
               None, None, regimes=tuple(REGIMES))


if __name__ == "__main__":
    main()
