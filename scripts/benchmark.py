"""The evidence study: does the cache keep online distillation's accuracy, and how many views does a run need?

    python scripts/benchmark.py --out bench_out    # writes docs/benchmark.md, docs/benchmark.json, docs/*.png

One teacher, trained long on ground truth, is dumped once with the most views; one small student is then
trained a fixed number of epochs E in every arm, with several seeds each:

    gt              ground truth only (no teacher)
    online          the teacher run at every step on a fresh augmentation every epoch (the classic way)
    cache k=K       distilled from the cache, restricted to its first K training views (`--train-views K`),
                    K in {E, E/4, E/16}; views are replayed E/K times, mirrored at random
    variety         at the smallest K: the train-time mirror off, and jitter / photometric changes on;
                    jitter at the storage K too
    storage         at one K: caches stored as float16, int16-step 0.8 % (the default) and int16-step 3 %
    diagnostics     K = E without the train-time mirror; the storage K with PNG instead of JPEG crops

Every stage runs once and is skipped when done (`OUT/state.json`); a training run killed mid-way resumes
from its last complete epoch (`--resume`), so the study can be stopped at any moment and run again in
several sittings. `--report-only` writes the report from whatever runs have finished.

Training time is the sum of the training loops' epoch times (`metrics.csv` "seconds": data loading,
teacher forward when online, student step), without validation.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kdcache.augment import StudentAugConfig  # noqa: E402
from kdcache.config import (DumpConfig, EvalConfig, OptimConfig, RunConfig, TrainStudentConfig,  # noqa: E402
                            TrainTeacherConfig, ValConfig, to_jsonable)
from kdcache.demo import DEMO_AUG  # noqa: E402
from kdcache.dump import dump_teacher  # noqa: E402
from kdcache.evaluate import evaluate  # noqa: E402
from kdcache.inspect_cache import cache_summary  # noqa: E402
from kdcache.losses import KDConfig  # noqa: E402
from kdcache.predict import PredictConfig  # noqa: E402
from kdcache.student import StudentConfig  # noqa: E402
from kdcache.synth import SynthConfig, synthesize  # noqa: E402
from kdcache.train import train_student, train_teacher  # noqa: E402

log = logging.getLogger("benchmark")

JITTER = StudentAugConfig(jitter_prob=0.5)
PHOTOMETRIC = StudentAugConfig(jitter_prob=0.5, color_prob=0.5, blur_prob=0.2, noise_prob=0.2, gray_prob=0.1,
                               occlusion_prob=0.3)


@dataclass(frozen=True)
class BenchmarkConfig:
    out: Path
    report: Path = Path("docs/benchmark.md")
    train_images: int = 2000              # one person per image: 2,000 training instances
    val_images: int = 500
    max_people: int = 1                   # the demo's easier synthetic set (README "The demo")
    clutter: float = 0.3
    input_hw: tuple[int, int] = (128, 96)  # CPU: a quarter of ViTPose's 256x192 pixels; heatmaps 32x24
    teacher_arch: str = "vitpose-tiny"
    teacher_epochs: int = 150             # trained long: the students get 16
    student: str = "mobilenetv3_small_050"
    student_head_channels: int = 64
    epochs: int = 16                      # E, every student arm
    train_views: tuple[int, ...] = (16, 4, 1)   # K = E, E/4, E/16 training views
    storage_views: int = 4                # the K of the storage comparison
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha: float = 0.5
    batch_size: int = 32
    lr: float = 2e-3
    val_every: int = 4
    workers: int = 2                      # online and ground-truth runs (they decode and warp whole images)
    cache_workers: int = 0                # cached runs: on 2 cores, loading in the training process is faster
    seed: int = 0                         # data, teacher and dump


@dataclass(frozen=True)
class Arm:
    """One way of training the student; `name` keys its runs (`OUT/runs/<name>-s<seed>`)."""

    name: str
    kind: str                             # "gt", "online" or "cache"
    train_views: int | None = None        # cache: K
    cache: str = "cache"                  # cache: folder under OUT
    storage: str = "int16-step 0.8%"
    mirror: bool = True                   # cache: train-time random mirror
    student_aug: StudentAugConfig = StudentAugConfig()
    variety: str = "mirror"               # what train-time variety the run has, in words
    view_seed: int | None = None          # online: the views of this seed (the dump's: the cache's views)


# The settings' names in caches() (and docs/benchmark.json): a cache manifest's, as the study has always
# recorded them; DumpConfig calls two of them differently.
DUMP_FIELDS = {"crop_encoding": "crop_format", "heatmap_encoding": "heatmap_storage"}


def caches(cfg: BenchmarkConfig) -> dict[str, dict[str, Any]]:
    """Cache folder -> dump settings: the study's main cache holds the most views; the storage caches hold
    `storage_views` training views each (the same views: they derive from (seed, ann_id, view)). The keys
    are the manifest's names; `dump_kwargs` turns them into DumpConfig fields."""
    reference = {"heatmap_encoding": "int16-step", "heatmap_rel_error": 0.008, "crop_encoding": "jpeg90"}  # pinned:
    # the study compares against these whatever kdcache's defaults are now (it moved them)
    return {
        "cache": {**reference, "views": max(cfg.train_views) + 1},
        "cache-float16": {**reference, "views": cfg.storage_views + 1, "heatmap_encoding": "float16"},
        "cache-eps03": {**reference, "views": cfg.storage_views + 1, "heatmap_rel_error": 0.03},
        "cache-png": {**reference, "views": cfg.storage_views + 1, "crop_encoding": "png"},
    }


def dump_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings of `caches` -> DumpConfig keyword arguments."""
    return {DUMP_FIELDS.get(key, key): value for key, value in settings.items()}


def arms(cfg: BenchmarkConfig) -> list[Arm]:
    small = min(cfg.train_views)
    out = [Arm("gt", "gt", variety="view augmentation"), Arm("online", "online", variety="view augmentation")]
    out += [Arm(f"cache-k{k}", "cache", train_views=k) for k in cfg.train_views]
    out += [Arm(f"cache-k{small}-nomirror", "cache", train_views=small, mirror=False, variety="none"),
            Arm(f"cache-k{small}-jitter", "cache", train_views=small, student_aug=JITTER,
                variety="mirror + jitter"),
            Arm(f"cache-k{small}-photo", "cache", train_views=small, student_aug=PHOTOMETRIC,
                variety="mirror + jitter + photometric")]
    out += [Arm(f"cache-k{cfg.storage_views}-float16", "cache", train_views=cfg.storage_views,
                cache="cache-float16", storage="float16"),
            Arm(f"cache-k{cfg.storage_views}-eps03", "cache", train_views=cfg.storage_views,
                cache="cache-eps03", storage="int16-step 3%")]
    # Where a cached run differs from an online one: the train-time mirror, and the JPEG crops.
    out += [Arm(f"cache-k{max(cfg.train_views)}-nomirror", "cache", train_views=max(cfg.train_views), mirror=False,
                variety="none"),
            Arm(f"cache-k{cfg.storage_views}-png", "cache", train_views=cfg.storage_views, cache="cache-png",
                storage="int16-step 0.8%, PNG crops"),
            Arm(f"cache-k{cfg.storage_views}-jitter", "cache", train_views=cfg.storage_views, student_aug=JITTER,
                variety="mirror + jitter"),
            # The cache's own views online, every seed: paired with cache-kE-nomirror, only storage differs.
            Arm("online-dumpviews", "online", view_seed=cfg.seed, variety="the cache's views")]
    return out


class Stages:
    """Runs named stages once; their results and cumulative wall time live in OUT/state.json."""

    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        entry = self.state.setdefault(name, {"done": False, "seconds": 0.0})
        if entry["done"]:
            return entry.get("result")
        log.info("stage %s", name)
        start = time.perf_counter()
        try:
            entry["result"] = fn()
            entry["done"] = True
        finally:
            entry["seconds"] += time.perf_counter() - start
            self._save()
        return entry["result"]

    def done(self, name: str) -> bool:
        return self.state.get(name, {}).get("done", False)

    def seconds(self, name: str) -> float:
        return self.state[name]["seconds"]

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.path)


def run_config(out: Path, name: str, seed: int, workers: int) -> RunConfig:
    """A study's training run `out/name`: resumed if killed, quiet."""
    return RunConfig(out=out / name, workers=workers, seed=seed, resume=True, progress=False)


def open_study(out: Path) -> tuple[Stages, Path, Path, Path, Path]:
    """A study's folder (made if missing) and its state, and where `data_and_teacher` writes: the data folder,
    its train and val annotation files, and the teacher's last.pt."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    return (Stages(out), data, data / "annotations/person_keypoints_train.json",
            data / "annotations/person_keypoints_val.json", out / "teacher/last.pt")


def data_and_teacher(stages: Stages, out: Path, cfg: Any, train_images: int, val_every: int) -> None:
    """The stages a study starts with: `kdcache synth` into out/data (`train_images`, `cfg.val_images`), and a
    teacher (`cfg.teacher_arch`, `cfg.teacher_epochs`) trained on its train split into out/teacher."""
    data = out / "data"
    stages.run("synth", lambda: str(synthesize(SynthConfig(
        out=data, train_images=train_images, val_images=cfg.val_images, seed=cfg.seed,
        max_people=cfg.max_people, clutter=cfg.clutter, workers=max(1, cfg.workers),
        keypoint_set=getattr(cfg, "keypoint_set", SynthConfig.keypoint_set)))))
    stages.run("teacher", lambda: str(train_teacher(TrainTeacherConfig(
        ann=data / "annotations/person_keypoints_train.json", images=data / "train",
        run=run_config(out, "teacher", cfg.seed, cfg.workers), arch=cfg.teacher_arch, input_hw=cfg.input_hw,
        aug=DEMO_AUG, val=ValConfig(ann=data / "annotations/person_keypoints_val.json", images=data / "val",
                                    every=val_every),
        optim=OptimConfig(epochs=cfg.teacher_epochs, batch_size=cfg.batch_size, lr=1e-3, weight_decay=0.05,
                          warmup_steps=100)))))


def run_study(cfg: BenchmarkConfig, stop_after: str | None = None) -> Stages:
    out = Path(cfg.out)
    stages, data, train_ann, val_ann, teacher = open_study(out)

    def run(name: str, seed: int = cfg.seed, workers: int = cfg.workers) -> RunConfig:
        return run_config(out, name, seed, workers)

    data_and_teacher(stages, out, cfg, cfg.train_images, val_every=10)
    predict = PredictConfig(workers=cfg.workers)
    stages.run("eval teacher", lambda: evaluate(EvalConfig(model=teacher, ann=val_ann, images=data / "val",
                                                           predict=predict)))
    # On its own training people: how far its targets there go beyond the ground truth.
    stages.run("eval teacher on train", lambda: evaluate(EvalConfig(model=teacher, ann=train_ann,
                                                                    images=data / "train", predict=predict)))
    if stop_after == "teacher":
        return stages
    for name, settings in caches(cfg).items():
        stages.run(f"dump {name}", lambda name=name, settings=settings: str(dump_teacher(DumpConfig(
            teacher=teacher, ann=train_ann, images=data / "train", run=run(name), batch_size=64, aug=DEMO_AUG,
            **dump_kwargs(settings)))))
        stages.run(f"size {name}", lambda name=name: cache_summary(out / name))
    if stop_after == "dump":
        return stages

    optim = OptimConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=100)
    student = StudentConfig(backbone=cfg.student, input_hw=cfg.input_hw, head_channels=cfg.student_head_channels)
    val = ValConfig(ann=val_ann, images=data / "val", every=cfg.val_every)
    for seed in cfg.seeds:  # seed-major: a partial study has every arm at the first seeds
        for arm in arms(cfg):
            name = f"runs/{arm.name}-s{seed}"
            if arm.kind == "gt":
                source = dict(ann=train_ann, images=data / "train", kd=KDConfig(alpha=0.0), run=run(name, seed))
            elif arm.kind == "online":
                source = dict(online_teacher=teacher, ann=train_ann, images=data / "train",
                              kd=KDConfig(alpha=cfg.alpha), view_seed=arm.view_seed, run=run(name, seed))
            else:
                source = dict(caches=(out / arm.cache,), train_views=arm.train_views, kd=KDConfig(alpha=cfg.alpha),
                              flip_prob=0.5 if arm.mirror else 0.0, student_aug=arm.student_aug,
                              run=run(name, seed, cfg.cache_workers))
            stages.run(f"train {name}", lambda source=source: str(train_student(TrainStudentConfig(
                student=student, aug=DEMO_AUG, optim=optim, val=val, **source))))
            stages.run(f"eval {name}", lambda name=name: evaluate(EvalConfig(
                model=out / name / "last.pt", ann=val_ann, images=data / "val", predict=predict)))
    # Does the student underfit (training-set AP close to validation AP) or overfit?
    first = f"runs/gt-s{cfg.seeds[0]}"
    stages.run("eval gt on train", lambda: evaluate(EvalConfig(model=out / first / "last.pt", ann=train_ann,
                                                               images=data / "train", predict=predict)))
    return stages


def train_seconds(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f))


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, validation AP) of every validated epoch."""
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["epoch"]), float(r["val_AP"])) for r in csv.DictReader(f) if r["val_AP"]]


def collect(cfg: BenchmarkConfig, stages: Stages) -> dict[str, Any]:
    """Everything the report needs, as the JSON written beside it (docs/benchmark.json)."""
    out = Path(cfg.out)
    teacher = stages.state["eval teacher"]["result"]
    runs = []
    for seed in cfg.seeds:
        for arm in arms(cfg):
            name = f"runs/{arm.name}-s{seed}"
            if not stages.done(f"eval {name}"):
                continue
            metrics = stages.state[f"eval {name}"]["result"]
            runs.append({"arm": arm.kind, "name": arm.name, "train_views": arm.train_views, "seed": seed,
                         "cache": arm.cache if arm.kind == "cache" else None,
                         "storage": arm.storage if arm.kind == "cache" else None,
                         "jitter": arm.student_aug.jitter_prob > 0, "mirror": arm.mirror and arm.kind == "cache",
                         "photometric": arm.student_aug.changes_pixels, "variety": arm.variety,
                         "epochs": cfg.epochs, "AP": metrics["AP"], "AP50": metrics["AP50"],
                         "AP75": metrics["AP75"], "AR": metrics["AR"],
                         "train_seconds": round(train_seconds(out / name), 1),
                         "val_curve": val_curve(out / name)})
    dumps = {name: {"seconds": round(stages.seconds(f"dump {name}"), 1), **settings,
                    "views_total": stages.state[f"size {name}"]["result"]["views"],
                    "kb_per_view": round(stages.state[f"size {name}"]["result"]["kb_per_view"], 2),
                    "kb_per_view_parts": stages.state[f"size {name}"]["result"]["kb_per_view_parts"]}
             for name, settings in caches(cfg).items() if stages.done(f"size {name}")}
    return {"config": to_jsonable(cfg),
            "teacher": {"arch": cfg.teacher_arch, "epochs": cfg.teacher_epochs, "AP": teacher["AP"],
                        "AP_on_training_set": stages.state.get("eval teacher on train", {}).get("result", {}).get("AP"),
                        "AP50": teacher["AP50"], "train_seconds": round(train_seconds(out / "teacher"), 1),
                        "val_curve": val_curve(out / "teacher")},
            "gt_student_AP_on_training_set": stages.state.get("eval gt on train", {}).get("result", {}).get("AP"),
            "dumps": dumps, "runs": runs,
            "study_seconds": round(sum(entry["seconds"] for entry in stages.state.values()), 1)}


def study_main(doc: str, make_config: Callable[[argparse.Namespace], Any], run: Callable[[Any, str | None], Stages],
               collect: Callable[[Any, Stages], dict[str, Any]], write_report: Callable[[Any, dict[str, Any]], None],
               out: str | None, report: str | None, regimes: tuple[str, ...] = ()) -> None:
    """A study's command line: run it (or stop early, or only report what has finished), then write its report.
    `make_config` reads the parsed arguments (`out`, `report` and, where the study has `regimes`, `regime`)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None if out is None else Path(out))
    p.add_argument("--report", type=Path, default=None if report is None else Path(report))
    if regimes:
        p.add_argument("--regime", choices=regimes, default=regimes[0], help="which regime of the study to run")
    p.add_argument("--stop-after", choices=("teacher", "dump"), help="stop early (e.g. to inspect the teacher)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs finished so far")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = make_config(a)
    stages = Stages(Path(cfg.out)) if a.report_only else run(cfg, a.stop_after)
    if a.stop_after is None:
        write_report(cfg, collect(cfg, stages))


def main() -> None:
    from benchmark_report import write_report
    study_main(__doc__, lambda a: BenchmarkConfig(out=a.out, report=a.report), run_study, collect,
               write_report, "bench_out", "docs/benchmark.md")


if __name__ == "__main__":
    main()
