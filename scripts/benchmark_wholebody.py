"""The whole-body cache study: what do 133 heatmaps per view cost, and how little storage keeps the student?

    python scripts/benchmark_wholebody.py                 # regime s128: docs/benchmark_wholebody.{md,json}
    python scripts/benchmark_wholebody.py --regime s256   # regime s256: docs/benchmark_wholebody_256.{md,json}

COCO-WholeBody's 133 keypoints (issue 15) are ~8x COCO's heatmap bytes per view. This study trains one
whole-body teacher on `kdcache synth --keypoint-set coco-wholebody-133` people at ViTPose's 256x192 (64x48
maps), dumps it once per heatmap storage (4 views per person), and distils the same small student from each
cache with several seeds. The judge of a storage is the student's whole-body AP (and each part's) against
the near-lossless reference, int16-step at 0.8 % (which the 17-joint study found level with float16):

    int16-step 0.8%            every pixel, 0.8 % relative L2 error (the reference)
    int16-step 3%              every pixel, 3 % (kdcache's default)
    int16-step-window 3%       a 13 x 13 window around each map's peak, 3 %; zeros elsewhere

Bytes per view are each cache's own (`kdcache inspect`), and the report scales them to COCO-WholeBody's
train set (~200k people at 8 views). Two regimes (`--regime`), each with its own folder and report:

    s128    the storage ablation: vitpose-tiny trained 80 epochs at 128x96 (32x24 maps; the 17-joint study's CPU
            recipe, docs/benchmark.md, on a shorter schedule), 3 storages x 3 student seeds
    s256    bytes, fidelity and read rate at ViTPose's 256x192 (64x48 maps, where the bytes matter): a CPU-sized
            vitpose-nano, 30 epochs; no students (its maps are those of a weak, soft teacher: a worst case)

Every stage runs once and is skipped when done (`OUT/state.json`); a training run killed mid-way resumes from
its last complete epoch. `--report-only` writes what has finished.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cache import heatmap_option, read_rate, sample_views  # noqa: E402
from benchmark import (Stages, data_and_teacher, open_study, run_config, study_main, train_seconds,  # noqa: E402
                       val_curve)
from benchmark_report import fmt, fmt_diff  # noqa: E402
from kdcache.config import DumpConfig, EvalConfig, OptimConfig, TrainStudentConfig, ValConfig, to_jsonable  # noqa: E402
from kdcache.demo import DEMO_AUG  # noqa: E402
from kdcache.dump import dump_teacher  # noqa: E402
from kdcache.evaluate import evaluate  # noqa: E402
from kdcache.inspect_cache import cache_summary  # noqa: E402
from kdcache.losses import KDConfig  # noqa: E402
from kdcache.metrics import WHOLEBODY_PARTS  # noqa: E402
from kdcache.predict import PredictConfig  # noqa: E402
from kdcache.student import StudentConfig  # noqa: E402
from kdcache.teacher import load_teacher  # noqa: E402
from kdcache.train import train_student  # noqa: E402

log = logging.getLogger("benchmark")

COCO_WHOLEBODY_PEOPLE = 200_000  # COCO-WholeBody v1.0's train persons, roughly (its paper: ~200k annotations)
VIEWS_AT_SCALE = 8
# name -> (heatmap storage, relative error); the first is the reference.
STORAGES = {"int16-step 0.8%": ("int16-step", 0.008), "int16-step 3%": ("int16-step", 0.03),
            "int16-step-window 3%": ("int16-step-window", 0.03)}


@dataclass(frozen=True)
class WholeBodyConfig:
    out: Path
    report: Path = Path("docs/benchmark_wholebody.md")
    regime: str = "s128"
    keypoint_set: str = "coco-wholebody-133"
    train_images: int = 1000              # one person per image
    val_images: int = 200
    max_people: int = 1
    clutter: float = 0.3
    input_hw: tuple[int, int] = (256, 192)  # ViTPose's crops: 64x48 maps, the size whose bytes matter
    teacher_arch: str = "vitpose-nano"    # CPU: the smallest ViTPose
    teacher_epochs: int = 30
    views: int = 4                        # per person, each cache
    student: str = "mobilenetv3_small_050"
    student_head_channels: int = 64
    epochs: int = 12                      # every student
    seeds: tuple[int, ...] = (0, 1, 2)
    alpha: float = 0.5
    batch_size: int = 32
    lr: float = 2e-3
    workers: int = 1
    seed: int = 0
    fidelity_views: int = 128             # views of the fidelity measurement (4 per person)


REGIMES: dict[str, dict[str, Any]] = {
    "s128": dict(out="bench_wholebody_128", report="docs/benchmark_wholebody.md", input_hw=(128, 96),
                 teacher_arch="vitpose-tiny", teacher_epochs=80, epochs=16),
    "s256": dict(out="bench_wholebody", report="docs/benchmark_wholebody_256.md", seeds=()),
}


def regime_config(regime: str, out: Path | None = None, report: Path | None = None) -> WholeBodyConfig:
    settings = dict(REGIMES[regime])
    default_out, default_report = Path(settings.pop("out")), Path(settings.pop("report"))
    return WholeBodyConfig(out=out or default_out, report=report or default_report, regime=regime, **settings)


def run_study(cfg: WholeBodyConfig, stop_after: str | None = None) -> Stages:
    out = Path(cfg.out)
    stages, data, train_ann, val_ann, teacher = open_study(out)
    data_and_teacher(stages, out, cfg, cfg.train_images, val_every=10)
    predict = PredictConfig(workers=cfg.workers)
    stages.run("eval teacher", lambda: evaluate(EvalConfig(model=teacher, ann=val_ann, images=data / "val",
                                                           predict=predict)))
    if stop_after == "teacher":
        return stages
    # Fidelity of each storage on the teacher's float32 maps (`scripts/bench_cache.py`'s measures).
    stages.run("fidelity", lambda: fidelity(teacher, train_ann, data / "train", cfg.fidelity_views))
    for name, (storage, eps) in STORAGES.items():
        folder = cache_folder(name)
        stages.run(f"dump {name}", lambda folder=folder, storage=storage, eps=eps: str(dump_teacher(DumpConfig(
            teacher=teacher, ann=train_ann, images=data / "train", views=cfg.views, batch_size=32, aug=DEMO_AUG,
            heatmap_storage=storage, heatmap_rel_error=eps, run=run_config(out, folder, cfg.seed, cfg.workers)))))
        stages.run(f"size {name}", lambda folder=folder: cache_summary(out / folder))
        stages.run(f"read {name}", lambda folder=folder: read_rate(out / folder))
    if stop_after == "dump":
        return stages
    optim = OptimConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=100)
    student = StudentConfig(backbone=cfg.student, input_hw=cfg.input_hw, head_channels=cfg.student_head_channels)
    val = ValConfig(ann=val_ann, images=data / "val", every=cfg.epochs)
    for seed in cfg.seeds:  # seed-major: a partial study has every storage at the first seeds
        for name in STORAGES:
            run = f"runs/{cache_folder(name)}-s{seed}"
            stages.run(f"train {run}", lambda name=name, run=run, seed=seed: str(train_student(TrainStudentConfig(
                student=student, caches=(out / cache_folder(name),), kd=KDConfig(alpha=cfg.alpha), aug=DEMO_AUG,
                optim=optim, val=val, run=run_config(out, run, seed, 0)))))
            stages.run(f"eval {run}", lambda run=run: evaluate(EvalConfig(
                model=out / run / "last.pt", ann=val_ann, images=data / "val", predict=predict)))
    return stages


def fidelity(teacher: Path, ann: Path, images: Path, views: int) -> dict[str, Any]:
    """Bytes, relative L2 error and keypoint error (argmax + DARK against float32) of each storage's maps."""
    crops, heat = sample_views(load_teacher(teacher), ann, images, views, batch=16)
    return {"views": len(heat), "raw_kb_per_view": heat[0].nbytes / 1000,
            "peak_median": float(np.median(heat.max(axis=(2, 3)))),
            "storages": {name: heatmap_option(heat, storage, eps, DumpConfig.gzip_level)
                         for name, (storage, eps) in STORAGES.items()}}


def cache_folder(name: str) -> str:
    return "cache-" + name.replace(" ", "-").replace("%", "pc")


def collect(cfg: WholeBodyConfig, stages: Stages) -> dict[str, Any]:
    out = Path(cfg.out)
    caches = {}
    for name, (storage, eps) in STORAGES.items():
        if stages.done(f"size {name}"):
            size = stages.state[f"size {name}"]["result"]
            caches[name] = {"heatmap_storage": storage, "rel_error": eps, "views": size["views"],
                            "kb_per_view": round(size["kb_per_view"], 2),
                            "kb_per_view_parts": size["kb_per_view_parts"],
                            "dump_seconds": round(stages.seconds(f"dump {name}"), 1)}
    for name in caches:
        if stages.done(f"read {name}"):
            read = stages.state[f"read {name}"]["result"]
            caches[name]["read_views_per_s"] = round(read["views_per_s_one_process"], 1)
    runs = []
    for seed in cfg.seeds:
        for name in STORAGES:
            run = f"runs/{cache_folder(name)}-s{seed}"
            if stages.done(f"eval {run}"):
                m = stages.state[f"eval {run}"]["result"]
                runs.append({"storage": name, "seed": seed, "AP": m["AP"], "AR": m["AR"],
                             **{f"{part} AP": m[f"{part} AP"] for part in WHOLEBODY_PARTS},
                             "train_seconds": round(train_seconds(out / run), 1)})
    teacher = stages.state.get("eval teacher", {}).get("result")
    return {"config": to_jsonable(cfg), "caches": caches, "runs": runs,
            "fidelity": stages.state.get("fidelity", {}).get("result"),
            "teacher": None if teacher is None else {
                "arch": cfg.teacher_arch, "epochs": cfg.teacher_epochs, "AP": teacher["AP"],
                **{f"{part} AP": teacher[f"{part} AP"] for part in WHOLEBODY_PARTS},
                "val_curve": val_curve(out / "teacher")},
            "study_seconds": round(sum(entry["seconds"] for entry in stages.state.values()), 1)}


def write_report(cfg: WholeBodyConfig, results: dict[str, Any]) -> None:
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps(results, indent=1))
    c = results["config"]
    others = ", ".join(f"[{name}]({Path(REGIMES[name]['report']).name})" for name in REGIMES if name != cfg.regime)
    lines = [f"# Whole-body cache: bytes per view and what storage precision costs the student (regime {cfg.regime})",
             "", f"Generated by `python scripts/benchmark_wholebody.py --regime {cfg.regime}` (resumable; "
             f"`--report-only` rewrites this file). The other regime: {others}.",
             "", "## Setup", "",
             f"- **Data**: `kdcache synth --keypoint-set coco-wholebody-133`, {c['train_images']} training and "
             f"{c['val_images']} validation images, one person each (clutter {c['clutter']}): COCO-WholeBody's "
             "layout, 133 keypoints (body, feet, face, hands).",
             f"- **Teacher**: {c['teacher_arch']}, {c['teacher_epochs']} epochs at {c['input_hw'][0]}x"
             f"{c['input_hw'][1]} (64x48 heatmaps, 133 of them)."]
    t = results["teacher"]
    if t:
        lines[-1] += (f" Validation whole-body AP {t['AP']:.1f} (body {t['body AP']:.1f}, foot {t['foot AP']:.1f}, "
                      f"face {t['face AP']:.1f}, hands {t['left_hand AP']:.1f} / {t['right_hand AP']:.1f}).")
    lines += [f"- **Caches**: the teacher dumped once per storage, {c['views']} views per person, JPEG 90 crops.",
              (f"- **Students**: {c['student']} (head {c['student_head_channels']}), {c['epochs']} epochs, "
               f"alpha {c['alpha']}, seeds {', '.join(map(str, c['seeds']))}; whole-body AP (COCO-WholeBody's "
               "protocol, ground-truth boxes) on the validation people, mean ± sample std over seeds; a difference "
               "marked * exceeds twice its standard error (Welch)." if c["seeds"] else
               "- **No students**: this regime measures the cache; the storage ablation is the other regime's."), "",
              "## Bytes per view", "",
              "Each cache's own bytes on disk (`kdcache inspect`), and random-access reads per second in one process "
              "(crop JPEG decode + heatmap inflate and decode + metadata; `scripts/bench_cache.py`'s `read_rate`).", "",
              "| storage | KB/view | heatmaps | crop | metadata | reads/s | total for "
              f"{COCO_WHOLEBODY_PEOPLE // 1000}k people x {VIEWS_AT_SCALE} views |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, cache in results["caches"].items():
        parts = cache["kb_per_view_parts"]
        total_gb = cache["kb_per_view"] * COCO_WHOLEBODY_PEOPLE * VIEWS_AT_SCALE / 1e6
        reads = f"{cache['read_views_per_s']:.0f}" if "read_views_per_s" in cache else "–"
        lines.append(f"| {name} | {cache['kb_per_view']:.1f} | {parts['heatmaps']:.1f} | {parts['crop']:.1f} | "
                     f"{parts['metadata']:.1f} | {reads} | {total_gb:.0f} GB |")
    fid = results.get("fidelity")
    if fid:
        lines += ["", f"Fidelity on {fid['views']} views of the teacher's float32 maps "
                  f"({fid['raw_kb_per_view']:.0f} KB raw per view; median peak {fid['peak_median']:.2f}): relative L2 "
                  "error of the decoded maps, and the keypoint error of argmax + DARK decoding against the float32 "
                  "decode, in heatmap pixels.", "",
                  "| storage | heatmaps KB/view | rel. L2 mean / max | kp err median / p99 (px) | > 0.05 px |",
                  "|---|---:|---:|---:|---:|"]
        for name, f in fid["storages"].items():
            lines.append(f"| {name} | {f['bytes_per_view'] / 1000:.1f} | {100 * f['rel_l2_mean']:.2f}% / "
                         f"{100 * f['rel_l2_max']:.2f}% | {f['kp_err_median_px']:.4f} / {f['kp_err_p99_px']:.3f} | "
                         f"{100 * f['kp_err_share_over_0.05']:.2f}% |")
    caches = results["caches"]
    full, window = caches.get("int16-step 3%"), caches.get("int16-step-window 3%")
    if full and window and fid:
        lines += ["", f"**Reading.** At {c['input_hw'][0]}x{c['input_hw'][1]}, 133 maps per view: the window "
                  f"storage keeps {window['kb_per_view_parts']['heatmaps']:.1f} KB of heatmaps per view against "
                  f"{full['kb_per_view_parts']['heatmaps']:.1f} for int16-step at the same 3 % budget "
                  f"({full['kb_per_view_parts']['heatmaps'] / window['kb_per_view_parts']['heatmaps']:.1f}x fewer), "
                  f"{window['kb_per_view']:.1f} KB per view in all. Its relative L2 error is the background it drops "
                  f"({100 * fid['storages']['int16-step-window 3%']['rel_l2_mean']:.0f} % of the maps' norm here, "
                  f"where the median peak is {fid['peak_median']:.2f}); decoded keypoints move "
                  f"{fid['storages']['int16-step-window 3%']['kp_err_median_px']:.3f} px at the median. Whether that "
                  "costs a student anything is the storage ablation's question."]
    if not c["seeds"]:  # (regime s256: no students)
        report.write_text("\n".join(lines) + "\n")
        log.info("wrote %s", report)
        return
    lines += ["", "## Student AP against storage", "",
              "| storage | whole-body AP | vs " + next(iter(STORAGES)) + " | " +
              " | ".join(f"{p} AP" for p in WHOLEBODY_PARTS) + " | body AP vs " + next(iter(STORAGES)) + " |",
              "|---|---:|---:|" + "---:|" * (len(WHOLEBODY_PARTS) + 1)]
    by_storage: dict[str, list[dict[str, Any]]] = {}
    for run in results["runs"]:
        by_storage.setdefault(run["storage"], []).append(run)
    first = by_storage.get(next(iter(STORAGES)), [])
    reference, body_reference = [r["AP"] for r in first], [r["body AP"] for r in first]
    for name, runs in by_storage.items():
        ap, body = [r["AP"] for r in runs], [r["body AP"] for r in runs]
        compared = name != next(iter(STORAGES)) and reference
        lines.append(f"| {name} | {fmt(ap)} (n={len(ap)}) | {fmt_diff(ap, reference) if compared else ''} | " +
                     " | ".join(fmt([r[f'{p} AP'] for r in runs]) for p in WHOLEBODY_PARTS) +
                     f" | {fmt_diff(body, body_reference) if compared else ''} |")
    if len(results["runs"]) < len(STORAGES) * len(c["seeds"]):
        lines += ["", f"In progress: {len(results['runs'])} of {len(STORAGES) * len(c['seeds'])} student runs done."]
    report.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", report)


def main() -> None:
    study_main(__doc__, lambda a: regime_config(a.regime, a.out, a.report), run_study, collect, write_report,
               None, None, regimes=tuple(REGIMES))


if __name__ == "__main__":
    main()
