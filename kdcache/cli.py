"""The `kdcache` command: argparse -> one frozen config per stage -> the stage function.

This is the only module that sees argv. User errors (`UserError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from kdcache import __version__
from kdcache.errors import UserError

if TYPE_CHECKING:
    from kdcache.cache_reader import Cache
    from kdcache.config import TrainStudentConfig

log = logging.getLogger("kdcache")


def _size(text: str) -> tuple[int, int]:
    """'256x192' -> (256, 192): crop height x width."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x192, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"crop size {text} must be positive multiples of 32 (e.g. 256x192, 128x96)")
    return h, w


# train-student probability flags -> StudentAugConfig fields, with what each one does.
STUDENT_AUG_FLAGS = (
    ("color", "color_prob", "brightness/contrast/saturation"),
    ("blur", "blur_prob", "Gaussian blur"),
    ("noise", "noise_prob", "Gaussian pixel noise"),
    ("grayscale", "gray_prob", "grayscale"),
    ("occlusion", "occlusion_prob", "random occluding rectangles"),
    ("jitter", "jitter_prob", "cached views: extra rotation/scale/shift of crop and heatmaps together"),
)


def _expert_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert", type=_expert, help="ViTPose++ expert by dataset name or index (default: coco)")


def _expert(text: str) -> str | int:
    """A ViTPose++ expert: a dataset name ('coco', 'aic', ...) or its index."""
    return int(text) if text.isdigit() else text


def _common(p: argparse.ArgumentParser, out_required: bool = True, batch: int = 32, workers: int = 2) -> None:
    p.add_argument("--out", type=Path, required=out_required, help="output folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--batch-size", type=int, default=batch, help=f"crops per batch (default: {batch})")
    p.add_argument("--workers", type=int, default=workers, help=f"DataLoader workers (default: {workers})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--ann", type=Path, required=required, help="COCO person_keypoints_*.json")
    p.add_argument("--images", type=Path, required=required, help="folder of the annotation file's images")


def _optim(p: argparse.ArgumentParser, epochs: int, lr: float, wd: float) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default: {epochs})")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimiser steps (0 = no bound)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak AdamW learning rate (default: {lr})")
    p.add_argument("--weight-decay", type=float, default=wd, help=f"AdamW weight decay (default: {wd})")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps (default: 100)")
    p.add_argument("--val-ann", type=Path, help="validation annotation file: AP each epoch and best.pt")
    p.add_argument("--val-images", type=Path, help="validation images folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--schedule", choices=("cosine", "step"), default="cosine", help="learning-rate decay")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights, e.g. 0.999 (0 = off)")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcache", description="Distil ViTPose into small pose networks "
                                     "from a cached teacher pass.")
    parser.add_argument("--version", action="version", version=f"kdcache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset in COCO person-keypoints layout")
    p.add_argument("--out", type=Path, required=True, help="dataset root")
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes (output is the same for any value)")
    p.add_argument("--max-people", type=int, default=4, help="people per image drawn from 1..P (default: 4)")
    p.add_argument("--clutter", type=float, default=1.0, help="background distractors, 0 = none (default: 1)")

    p = sub.add_parser("train-teacher", help="train a ViTPose model on ground truth")
    _data(p)
    _common(p)
    _optim(p, epochs=210, lr=5e-4, wd=0.1)
    p.add_argument("--arch", default="vitpose-s", help="vitpose-s/b/l/h, or vitpose-tiny/nano for CPU")
    p.add_argument("--head", choices=("classic", "simple"), default="classic")
    p.add_argument("--input-size", type=_size, default=(256, 192), help="crop HxW (default: 256x192)")

    p = sub.add_parser("dump-teacher", help="stage 1: teacher heatmaps of K views per instance -> cache")
    p.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint")
    _data(p)
    _common(p, batch=64)
    p.add_argument("--views", type=int, default=8, help="views per instance; view 0 is un-augmented (default: 8)")
    p.add_argument("--shard-size", type=int, default=1024, help="views per shard (default: 1024)")
    p.add_argument("--crop", choices=("jpeg", "png", "none"), default="jpeg",
                   help="crop codec; 'none' stores no crops (training replays them from the images with the "
                        "stored affine) (default: jpeg)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="crop JPEG quality (default: 90)")
    p.add_argument("--heatmap-encoding", choices=("int16-step", "float16", "uint8-minmax-per-joint"),
                   default="int16-step", help="how teacher heatmaps are stored (default: int16-step)")
    p.add_argument("--heatmap-error", type=float, default=0.008,
                   help="int16-step: relative L2 error of each stored heatmap (default: 0.008)")
    p.add_argument("--gzip-level", type=int, default=2, choices=range(1, 10), metavar="1..9",
                   help="deflate level of the heatmap chunks (default: 2)")
    p.add_argument("--teacher-flip", action="store_true",
                   help="store the mean of the teacher on the crop and on its mirror (2x teacher time)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="go on past missing or unreadable images and list them in manifest.json")
    _expert_flag(p)

    p = sub.add_parser("train-student", help="stage 2: train a student from the cache (or online, or on "
                       "ground truth only when neither --cache nor --online-teacher is given)")
    p.add_argument("--cache", type=Path, help="teacher cache from dump-teacher")
    p.add_argument("--online-teacher", type=Path, help="baseline: run this teacher every step instead")
    _expert_flag(p)
    _data(p, required=False)
    p.add_argument("--student", required=True, help="timm backbone name, e.g. mobilenetv3_large_100")
    p.add_argument("--head", choices=("deconv", "light"), default="deconv")
    p.add_argument("--head-channels", type=int, default=128)
    p.add_argument("--pretrained", default="", help="'timm' (local timm cache only) or a weights file")
    p.add_argument("--input-size", type=_size, default=None, help="crop HxW (default: the cache's)")
    _common(p)
    _optim(p, epochs=10, lr=1e-3, wd=1e-4)
    p.add_argument("--alpha", type=float, default=0.5, help="teacher-loss weight; 1-alpha on ground truth")
    p.add_argument("--kd-loss", choices=("mse", "kl"), default="mse",
                   help="teacher term: heatmap MSE, or KL of spatially softmaxed heatmaps")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="--kd-loss kl: temperature (default: 1)")
    p.add_argument("--train-views", type=int, default=0, metavar="K",
                   help="train on the cache's first K augmented views only, epoch e reading view 1 + e mod K "
                        "(0 = all of them; for measuring how many views a run needs)")
    p.add_argument("--confidence-weights", action="store_true",
                   help="weight each joint's teacher term by the teacher's confidence (its peak)")
    for flag, _, what in STUDENT_AUG_FLAGS:
        p.add_argument(f"--{flag}", type=float, default=0.0, metavar="P",
                       help=f"probability of {what} on the student's crop (default: 0, off)")

    p = sub.add_parser("eval", help="stage 3: COCO keypoint AP of any checkpoint")
    p.add_argument("--model", type=Path, required=True)
    _data(p)
    p.add_argument("--boxes", type=Path, help="COCO detection results (default: ground-truth boxes)")
    p.add_argument("--box-score-thr", type=float, default=0.0, help="drop detections below this score")
    p.add_argument("--flip-test", action="store_true", help="average with the mirrored crop")
    p.add_argument("--metrics-out", type=Path)
    p.add_argument("--results-out", type=Path)
    p.add_argument("--vis", type=Path, metavar="DIR",
                   help="write PNGs of the predictions (orange, score >= 0.3) over the ground truth (green)")
    p.add_argument("--vis-count", type=int, default=20, help="images drawn by --vis (default: 20)")
    _expert_flag(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)

    p = sub.add_parser("inspect", help="summary of a cache; --verify checks it; --png draws a contact sheet")
    p.add_argument("cache", type=Path)
    p.add_argument("--verify", action="store_true", help="check every shard's size, SHA-256 and rows")
    p.add_argument("--png", type=Path, help="write a contact sheet of crops with their heatmaps")
    p.add_argument("--count", type=int, default=16, help="views on the contact sheet (default: 16)")

    p = sub.add_parser("bench", help="params, GFLOPs, latency and throughput side by side")
    p.add_argument("models", type=Path, nargs="+")
    _expert_flag(p)
    p.add_argument("--device", help="comma-separated devices, side by side, e.g. cpu,cuda (default: cpu, "
                   "plus cuda when available)")
    p.add_argument("--batch-size", type=int, default=32, help="throughput batch (default: 32)")
    p.add_argument("--bf16", action="store_true", help="time CUDA under bf16 autocast (CPU stays fp32)")

    p = sub.add_parser("export", help="ONNX export checked against PyTorch")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--onnx", type=Path, required=True)
    _expert_flag(p)

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data, ending in one table")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) that checks the plumbing only")
    return parser


# ---- stage adapters: argparse namespace -> config -> stage function --------------------------

def _run_config(a: argparse.Namespace):
    from kdcache.config import RunConfig

    return RunConfig(out=a.out, device=a.device, workers=a.workers, seed=a.seed, progress=not a.no_progress,
                     resume=getattr(a, "resume", False))


def _optim_config(a: argparse.Namespace):
    from kdcache.config import OptimConfig, ValConfig

    if (a.val_ann is None) != (a.val_images is None):
        raise UserError("--val-ann and --val-images go together")
    optim = OptimConfig(epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
                        weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, schedule=a.schedule, ema=a.ema)
    return optim, ValConfig(ann=a.val_ann, images=a.val_images, every=a.val_every)


def cmd_synth(a: argparse.Namespace) -> int:
    from kdcache.synth import SynthConfig, synthesize

    out = synthesize(SynthConfig(out=a.out, train_images=a.train_images, val_images=a.val_images,
                                 seed=a.seed, workers=a.workers, max_people=a.max_people, clutter=a.clutter))
    print(f"wrote {out}")
    return 0


def cmd_train_teacher(a: argparse.Namespace) -> int:
    from kdcache.config import TrainTeacherConfig
    from kdcache.train import train_teacher

    optim, val = _optim_config(a)
    cfg = TrainTeacherConfig(ann=a.ann, images=a.images, run=_run_config(a), arch=a.arch, head=a.head,
                             input_hw=a.input_size, optim=optim, val=val)
    print(f"wrote {train_teacher(cfg)}")
    return 0


def cmd_dump_teacher(a: argparse.Namespace) -> int:
    from kdcache.cache import read_manifest
    from kdcache.config import DumpConfig
    from kdcache.dump import dump_teacher

    if not 1 <= a.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be within 1..100 (got {a.jpeg_quality})")
    if a.shard_size < 1 or a.batch_size < 1:
        raise UserError("--shard-size and --batch-size must be at least 1")
    crop = f"jpeg{a.jpeg_quality}" if a.crop == "jpeg" else a.crop
    cfg = DumpConfig(teacher=a.teacher, ann=a.ann, images=a.images, run=_run_config(a), views=a.views,
                     batch_size=a.batch_size, shard_size=a.shard_size, crop_encoding=crop,
                     heatmap_encoding=a.heatmap_encoding, heatmap_rel_error=a.heatmap_error,
                     gzip_level=a.gzip_level, teacher_flip=a.teacher_flip, skip_bad_images=a.skip_bad_images,
                     expert=a.expert)
    out = dump_teacher(cfg)
    skipped = (read_manifest(out) or {}).get("skipped_images", [])
    if skipped:
        print(f"skipped {len(skipped)} unreadable images (listed in {out / 'manifest.json'})")
    print(f"wrote {out}")
    return 0


def cmd_train_student(a: argparse.Namespace) -> int:
    from kdcache.augment import StudentAugConfig
    from kdcache.config import TrainStudentConfig
    from kdcache.student import StudentConfig
    from kdcache.train import train_student

    cache = _sound_cache(a.cache) if a.cache is not None else None
    input_hw = a.input_size or (cache.input_hw if cache is not None else (256, 192))
    student = StudentConfig(backbone=a.student, head=a.head, input_hw=tuple(input_hw),
                            head_channels=a.head_channels, pretrained=a.pretrained)
    optim, val = _optim_config(a)
    if not 0.0 <= a.alpha <= 1.0:
        raise UserError(f"--alpha must be within [0, 1] (got {a.alpha})")
    probs = {field: getattr(a, flag) for flag, field, _ in STUDENT_AUG_FLAGS}
    bad = [f"--{flag}" for flag, field, _ in STUDENT_AUG_FLAGS if not 0.0 <= probs[field] <= 1.0]
    if bad:
        raise UserError(f"{', '.join(bad)} must be a probability in [0, 1]")
    if a.kd_temperature <= 0:
        raise UserError(f"--kd-temperature must be positive (got {a.kd_temperature})")
    cfg = TrainStudentConfig(student=student, run=_run_config(a), cache=a.cache, online_teacher=a.online_teacher,
                             expert=a.expert, ann=a.ann, images=a.images, alpha=a.alpha, kd_loss=a.kd_loss,
                             kd_temperature=a.kd_temperature, confidence_weights=a.confidence_weights,
                             train_views=a.train_views,
                             student_aug=StudentAugConfig(**probs), optim=optim, val=val)
    if cache is not None:
        _check_cache_fits(cache, cfg)
    print(f"wrote {train_student(cfg)}")
    return 0


def _sound_cache(path: Path) -> Cache:
    """The cache at `path`, refused with one line when it is missing, incomplete, truncated or corrupt."""
    from kdcache.cache import open_cache, verify_cache

    cache = open_cache(path)  # missing, foreign, unreadable schema, incomplete
    problems = verify_cache(path)  # sizes, SHA-256 and rows of every shard
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"cache {path} is damaged: {problems[0]}{more}; run `kdcache inspect {path} --verify` "
                        "and re-run the same dump-teacher command to rewrite it")
    return cache


def _check_cache_fits(cache: Cache, cfg: TrainStudentConfig) -> None:
    """Say what in the cache does not match the student's settings."""
    from kdcache.cache import check_compatible
    from kdcache.data import heatmap_hw_for

    input_hw = tuple(cfg.student.input_hw)
    mismatch = check_compatible(cache.manifest, input_hw, heatmap_hw_for(input_hw), cfg.sigma)
    if mismatch:
        hw = cache.input_hw
        raise UserError(f"cache {cache.path} does not match the student: {'; '.join(mismatch)}; pass "
                        f"--input-size {hw[0]}x{hw[1]} or dump a cache with the student's settings")


def cmd_eval(a: argparse.Namespace) -> int:
    from kdcache.config import EvalConfig
    from kdcache.evaluate import evaluate, format_metrics

    if a.vis is not None and a.vis_count < 1:
        raise UserError(f"--vis-count must be at least 1 (got {a.vis_count})")
    cfg = EvalConfig(model=a.model, ann=a.ann, images=a.images, boxes=a.boxes, expert=a.expert,
                     flip_test=a.flip_test,
                     box_score_thr=a.box_score_thr, batch_size=a.batch_size, workers=a.workers, device=a.device,
                     metrics_out=a.metrics_out, results_out=a.results_out, vis_dir=a.vis, vis_count=a.vis_count)
    print(format_metrics(evaluate(cfg)))
    if a.vis is not None:
        print(f"wrote {a.vis} (predictions over ground truth, first {a.vis_count} images)")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from kdcache.cache import verify_cache
    from kdcache.inspect_cache import cache_summary, contact_sheet_of, format_summary

    if a.verify:
        problems = verify_cache(a.cache)
        for problem in problems:
            print(f"{a.cache}: {problem}")
        if problems:
            raise UserError(f"cache {a.cache} failed verification ({len(problems)} problems above); "
                            "re-run the same dump-teacher command to rewrite damaged shards")
    print(format_summary(cache_summary(a.cache)))
    if a.verify:
        print("verify: all shards complete, checksums match")
    if a.png is not None:
        print(f"wrote {contact_sheet_of(a.cache, a.png, a.count)}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from kdcache.bench import bench_models, format_table, resolve_devices
    from kdcache.checkpoint import load_model, model_input_hw

    devices = resolve_devices(a.device)
    if a.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {a.batch_size})")
    models = {str(path): load_model(path, "cpu", expert=a.expert) for path in a.models}
    sizes = {model_input_hw(m) for m in models.values()}
    if len(sizes) != 1:
        raise UserError(f"models take different crop sizes {sorted(sizes)}; bench compares one size at a time")
    print(format_table(bench_models(models, sizes.pop(), devices=devices, batch=a.batch_size, bf16=a.bf16)))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from kdcache.checkpoint import load_model, model_input_hw
    from kdcache.export import export_onnx

    model = load_model(a.model, expert=a.expert)
    diff = export_onnx(model, a.onnx, model_input_hw(model))
    print(f"wrote {a.onnx} (max abs difference to PyTorch: {diff:.2e})")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from kdcache.demo import DemoConfig, format_demo_table, run_demo

    rows = run_demo(DemoConfig(out=a.out, quick=a.quick))
    print(format_demo_table(rows))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "synth": cmd_synth, "train-teacher": cmd_train_teacher, "dump-teacher": cmd_dump_teacher,
    "train-student": cmd_train_student, "eval": cmd_eval, "inspect": cmd_inspect, "bench": cmd_bench,
    "export": cmd_export, "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"kdcache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdcache {args.command}: interrupted; completed outputs are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
