"""`kdcache demo`: synth -> train-teacher -> dump-teacher -> train-student -> eval, on a 2-core CPU.

Everything runs through the same stage functions as the commands. The defaults are sized so that the
whole pipeline ends within 15 minutes on a 2-core CPU while the teacher still learns the synthetic task
well enough that distilling from it means something (README "Demo" gives the measured numbers).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.bench import count_gflops, count_params, measure_latency
from kdcache.config import (DumpConfig, OptimConfig, RunConfig, TrainStudentConfig, TrainTeacherConfig,
                            to_jsonable)
from kdcache.dump import dump_teacher
from kdcache.evaluate import evaluate_model
from kdcache.inspect_cache import cache_summary
from kdcache.losses import KDConfig
from kdcache.models import load_model
from kdcache.predict import PredictConfig
from kdcache.student import StudentConfig
from kdcache.synth import SynthConfig, synthesize
from kdcache.train import train_student, train_teacher
from kdcache.transforms import AugmentConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out: Path                             # demo folder: data/, teacher/, cache/, student/, results.json
    quick: bool = False                   # seconds-long plumbing check instead of the real demo
    train_images: int = 1500              # synthetic training images
    val_images: int = 150                 # synthetic validation images
    max_people: int = 1                   # people per image: a task a CPU can learn in minutes
    clutter: float = 0.3                  # background distractors (the full synth default is 1.0)
    input_hw: tuple[int, int] = (128, 96)  # crop (H, W); heatmaps 32x24
    teacher_arch: str = "vitpose-nano"
    teacher_epochs: int = 54              # ~2,500 steps of 32 crops
    views: int = 9                        # cached views per instance: view 0 plus one per student epoch
    student: str = "mobilenetv3_large_100"
    student_epochs: int = 8               # an epoch is one view of every instance
    alpha: float = 0.5
    workers: int = 2
    seed: int = 0


# A few minutes of CPU training is far too short for ViTPose's rotation and half-body augmentation to
# pay off (measured: it halves the teacher's AP at this budget); flip, scale and shift stay.
DEMO_AUG = AugmentConfig(rot_prob=0.0, half_body_prob=0.0)

QUICK = dict(train_images=8, val_images=4, teacher_arch="vitpose-nano", teacher_epochs=1, views=2,
             student="mobilenetv3_small_100", student_epochs=1)


def run_demo(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Run the pipeline; returns one table row per model (teacher, student)."""
    if cfg.quick:
        cfg = DemoConfig(out=cfg.out, quick=True, **QUICK)
    out = Path(cfg.out)
    for part in ("data", "teacher", "cache", "student"):  # only what the demo itself writes
        shutil.rmtree(out / part, ignore_errors=True)
    progress = not cfg.quick
    run = lambda name: RunConfig(out=out / name, workers=cfg.workers, seed=cfg.seed, progress=progress)  # noqa: E731
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        log.info("demo: %s", name)
        result = fn(*args)
        timings[name] = time.perf_counter() - start
        return result

    data = timed("synth", synthesize, SynthConfig(out=out / "data", train_images=cfg.train_images,
                                                  val_images=cfg.val_images, seed=cfg.seed,
                                                  max_people=cfg.max_people, clutter=cfg.clutter, workers=cfg.workers))
    train_ann = data / "annotations/person_keypoints_train.json"
    val_ann = data / "annotations/person_keypoints_val.json"
    teacher_run = timed("train-teacher", train_teacher, TrainTeacherConfig(
        ann=train_ann, images=data / "train", run=run("teacher"), arch=cfg.teacher_arch, input_hw=cfg.input_hw,
        aug=DEMO_AUG,
        optim=OptimConfig(epochs=cfg.teacher_epochs, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_steps=50)))
    cache = timed("dump-teacher", dump_teacher, DumpConfig(
        teacher=teacher_run / "best.pt", ann=train_ann, images=data / "train", run=run("cache"), views=cfg.views,
        aug=DEMO_AUG))
    student_run = timed("train-student", train_student, TrainStudentConfig(
        student=StudentConfig(backbone=cfg.student, input_hw=cfg.input_hw), run=run("student"), caches=(cache,),
        kd=KDConfig(alpha=cfg.alpha), aug=DEMO_AUG,
        optim=OptimConfig(epochs=cfg.student_epochs, batch_size=32, lr=2e-3, warmup_steps=50)))

    kb_per_view = cache_summary(cache)["kb_per_view"]
    rows = []
    for name, ckpt in (("teacher " + cfg.teacher_arch, teacher_run / "best.pt"),
                       ("student " + cfg.student, student_run / "best.pt")):
        model = load_model(ckpt)
        start = time.perf_counter()
        metrics, _ = evaluate_model(model, val_ann, data / "val", predict=PredictConfig(workers=cfg.workers))
        timings[f"eval {name}"] = time.perf_counter() - start
        rows.append({"model": name, "AP": metrics["AP"], "AP50": metrics["AP50"],
                     "params_m": count_params(model) / 1e6, "gflops": count_gflops(model, cfg.input_hw),
                     "ms_per_crop": measure_latency(model, cfg.input_hw, batch=1),
                     "cache_kb_per_view": kb_per_view if name.startswith("student") else None})
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "timings_s": timings, "config": to_jsonable(cfg)}, indent=1))
    return rows


def format_demo_table(rows: list[dict[str, Any]]) -> str:
    """Teacher vs student, one markdown table."""
    head = "| model | AP | AP50 | params (M) | GFLOPs | ms/crop (CPU, batch 1) | cache KB/view |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kb = "" if r["cache_kb_per_view"] is None else f"{r['cache_kb_per_view']:.1f}"
        lines.append(f"| {r['model']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['params_m']:.2f} | "
                     f"{r['gflops']:.3f} | {r['ms_per_crop']:.1f} | {kb} |")
    return "\n".join(lines)
