"""The `kdcache` command: argparse -> one frozen config per stage -> the stage function.

This is the only module that sees argv (its flags are in `cli_parser`). Every failure a user can meet ends
in one line on stderr and a non-zero exit, from one place, `main`: user errors (`UserError`: bad input,
what to do) exit 2; environment errors (a full disk, no permission, out of memory) exit 1. Completed
outputs are kept in both cases.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from kdcache.cli_parser import STUDENT_AUG_FLAGS, VIEW_AUG_FLAGS, build_parser
from kdcache.errors import UserError

if TYPE_CHECKING:
    from kdcache.cache_reader import Cache
    from kdcache.transforms import AugmentConfig

log = logging.getLogger("kdcache")


# ---- stage adapters: argparse namespace -> config -> stage function --------------------------

def _check_device(name: str) -> str:
    """One device PyTorch can use here, refused in one line before any work (e.g. cuda without a GPU)."""
    from kdcache.bench import resolve_devices

    if "," in name:
        raise UserError(f"--device {name}: this command runs on one device; pass cpu, cuda or cuda:N")
    return resolve_devices(name)[0]


def _run_config(a: argparse.Namespace):
    from kdcache.config import RunConfig

    return RunConfig(out=a.out, device=_check_device(a.device), workers=a.workers, seed=a.seed,
                     progress=_progress(a), resume=getattr(a, "resume", False),
                     overwrite=getattr(a, "overwrite", False))


def _progress(a: argparse.Namespace) -> bool:
    """Progress bars only for a person watching: not with --no-progress, -q, or stderr to a file or pipe."""
    return not (getattr(a, "no_progress", False) or a.quiet) and sys.stderr.isatty()


def _optim_config(a: argparse.Namespace):
    from kdcache.config import OptimConfig, ValConfig

    if (a.val_ann is None) != (a.val_images is None):
        raise UserError("--val-ann and --val-images go together; pass both or neither")
    optim = OptimConfig(epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
                        weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, schedule=a.schedule, ema=a.ema)
    return optim, ValConfig(ann=a.val_ann, images=a.val_images, every=a.val_every, keypoint_set=a.keypoint_set)


def _given_view_aug(a: argparse.Namespace) -> dict[str, float]:
    """AugmentConfig fields the user set with the view augmentation flags."""
    return {field: getattr(a, flag.replace("-", "_")) for flag, field, _, _ in VIEW_AUG_FLAGS
            if getattr(a, flag.replace("-", "_")) is not None}


def _view_aug_config(a: argparse.Namespace) -> AugmentConfig:
    from kdcache.transforms import AugmentConfig

    return AugmentConfig(**_given_view_aug(a))


def cmd_synth(a: argparse.Namespace) -> int:
    from kdcache.synth import SynthConfig, synthesize

    out = synthesize(SynthConfig(out=a.out, train_images=a.train_images, val_images=a.val_images,
                                 unlabelled_images=a.unlabelled_images, seed=a.seed, workers=a.workers,
                                 max_people=a.max_people, clutter=a.clutter, keypoint_set=a.keypoint_set))
    print(f"wrote {out}")
    return 0


def cmd_train_teacher(a: argparse.Namespace) -> int:
    from kdcache.config import TrainTeacherConfig
    from kdcache.train import train_teacher

    optim, val = _optim_config(a)
    cfg = TrainTeacherConfig(ann=a.ann, images=a.images, run=_run_config(a), arch=a.arch, head=a.head,
                             input_hw=a.input_size, optim=optim, aug=_view_aug_config(a), val=val,
                             keypoint_set=a.keypoint_set)
    print(f"wrote {train_teacher(cfg)}")
    return 0


def cmd_dump_teacher(a: argparse.Namespace) -> int:
    from kdcache.cache import read_manifest
    from kdcache.config import DumpConfig
    from kdcache.dump import dump_teacher

    crop = f"jpeg{a.jpeg_quality}" if a.crop == "jpeg" else a.crop
    cfg = DumpConfig(teacher=a.teacher, ann=a.ann, images=a.images, run=_run_config(a), boxes=a.boxes,
                     box_score_thr=a.box_score_thr, persons=a.persons, views=a.views,
                     batch_size=a.batch_size, shard_size=a.shard_size, crop_format=crop,
                     heatmap_storage=a.heatmap_encoding, heatmap_rel_error=a.heatmap_error,
                     gzip_level=a.gzip_level, teacher_flip=a.teacher_flip, skip_bad_images=a.skip_bad_images,
                     expert=a.expert, aug=_view_aug_config(a), keypoint_set=a.keypoint_set)
    out = dump_teacher(cfg, verify=a.verify)
    skipped = (read_manifest(out) or {}).get("skipped_images", [])
    if skipped:
        print(f"skipped {len(skipped)} unreadable images (listed in {out / 'manifest.json'})")
    print(f"wrote {out}")
    return 0


def cmd_train_student(a: argparse.Namespace) -> int:
    from kdcache.augment import StudentAugConfig
    from kdcache.config import TrainStudentConfig, check_cache_weights
    from kdcache.losses import KDConfig
    from kdcache.sources import check_cache_fits
    from kdcache.student import StudentConfig
    from kdcache.train import train_student

    run = _run_config(a)
    view_aug = _given_view_aug(a)
    flip = view_aug.pop("flip_prob", None)
    paths = tuple(a.cache or ())
    if paths and view_aug:
        flags = ", ".join(f"--{flag}" for flag, field, _, _ in VIEW_AUG_FLAGS if field in view_aug)
        raise UserError(f"{flags} set(s) the views of online and ground-truth runs; a cache's views were fixed by "
                        "dump-teacher (see `kdcache inspect`): drop them, or pass them to dump-teacher")
    if a.view_seed is not None and paths:
        raise UserError("--view-seed picks the views of online and ground-truth runs; a cache's views are its "
                        "dump's: drop --view-seed")
    if a.train_views and not paths:
        raise UserError("--train-views restricts the views of a cache; pass --cache, or drop --train-views")
    check_cache_weights(len(paths), a.cache_weight)  # before the caches are verified (SHA-256 of every shard)
    caches = [_sound_cache(path) for path in paths]
    input_hw = a.input_size or (caches[0].input_hw if caches else StudentConfig.input_hw)
    student = StudentConfig(backbone=a.student, head=a.head, input_hw=tuple(input_hw),
                            head_channels=a.head_channels, pretrained=a.pretrained)
    optim, val = _optim_config(a)
    probs = {field: getattr(a, flag) for flag, field, _ in STUDENT_AUG_FLAGS}
    if probs["jitter_prob"] is None:
        probs["jitter_prob"] = _default_jitter(caches, a)
    aug = _view_aug_config(a) if not paths else None
    kd = KDConfig(alpha=a.alpha, loss=a.kd_loss, temperature=a.kd_temperature,
                  confidence_weights=a.confidence_weights, box_score_weights=a.box_score_weights)
    cfg = TrainStudentConfig(student=student, run=run, caches=paths, cache_weights=tuple(a.cache_weight or ()),
                             online_teacher=a.online_teacher, expert=a.expert, ann=a.ann, images=a.images, kd=kd,
                             train_views=a.train_views, view_seed=a.view_seed, student_aug=StudentAugConfig(**probs),
                             optim=optim, val=val, keypoint_set=a.keypoint_set,
                             **({"aug": aug} if aug is not None else {}),
                             **({"flip_prob": flip} if flip is not None and paths else {}))
    for cache in caches:  # also checked by train_student; here before the run folder is touched
        check_cache_fits(cache, cfg.student, cfg.sigma)
    print(f"wrote {train_student(cfg)}")
    return 0


# --jitter when the run replays cached views: at 16 replays per view it recovered 3.7 AP of the 4.9 that
# view reuse cost, and at 4 replays it cost nothing (docs/benchmark.md).
REPLAY_JITTER = 0.5


def _default_jitter(caches: list[Cache], a: argparse.Namespace) -> float:
    """`--jitter` left out: REPLAY_JITTER when the run reads some cached view more than once, else 0."""
    weights = a.cache_weight or [1.0] * len(caches)
    for cache, weight in zip(caches, weights):
        views = int(cache.manifest.get("dump", {}).get("views") or 1)
        usable = a.train_views or max(1, views - 1)
        draws = a.epochs * math.ceil(weight)  # the most draws of one person over the run
        if draws > usable:
            log.info("--jitter %.1f: %d draws per person replay the %d training views of cache %s (pass --jitter 0 "
                     "to turn it off)", REPLAY_JITTER, draws, usable, cache.path)
            return REPLAY_JITTER
    return 0.0


def _sound_cache(path: Path) -> Cache:
    """The cache at `path`, refused with one line when it is missing, incomplete, truncated or corrupt."""
    from kdcache.cache import open_cache, verify_cache

    cache = open_cache(path)  # missing, foreign, unreadable schema, incomplete
    problems = verify_cache(path)  # sizes, SHA-256 and rows of every shard
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"cache {path} is damaged: {problems[0]}{more}; run `kdcache inspect {path} --verify` "
                        "and re-run the same dump-teacher command with --verify to rewrite it")
    return cache


def cmd_eval(a: argparse.Namespace) -> int:
    from kdcache.config import EvalConfig
    from kdcache.evaluate import evaluate, score_results
    from kdcache.metrics import format_metrics
    from kdcache.predict import PredictConfig

    if a.results is not None:
        ignored = [flag for flag, value in (("--images", a.images), ("--boxes", a.boxes), ("--vis", a.vis),
                                            ("--results-out", a.results_out), ("--flip-test", a.flip_test))
                   if value]
        if ignored:
            raise UserError(f"--results scores a finished results file; {', '.join(ignored)} need(s) --model")
        print(format_metrics(score_results(a.ann, a.results, metrics_out=a.metrics_out,
                                           keypoint_set=a.keypoint_set)))
        return 0
    if a.images is None:
        raise UserError("--model needs --images, the folder of the annotation file's images")
    predict = PredictConfig(flip_test=a.flip_test, batch_size=a.batch_size, workers=a.workers, progress=_progress(a))
    cfg = EvalConfig(model=a.model, ann=a.ann, images=a.images, boxes=a.boxes, expert=a.expert,
                     box_score_thr=a.box_score_thr, predict=predict, device=_check_device(a.device),
                     metrics_out=a.metrics_out, results_out=a.results_out, vis_dir=a.vis, vis_count=a.vis_count,
                     keypoint_set=a.keypoint_set)
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
                            "re-run the same dump-teacher command with --verify to rewrite damaged shards")
    print(format_summary(cache_summary(a.cache)))
    if a.verify:
        print("verify: all shards complete, checksums match")
    if a.png is not None:
        print(f"wrote {contact_sheet_of(a.cache, a.png, a.count)}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from kdcache.bench import bench_models, format_table, resolve_devices
    from kdcache.models import load_model, model_input_hw

    devices = resolve_devices(a.device)
    models = {str(path): load_model(path, "cpu", expert=a.expert) for path in a.models}
    sizes = {model_input_hw(m) for m in models.values()}
    if len(sizes) != 1:
        raise UserError(f"models take different crop sizes {sorted(sizes)}; bench compares one size at a time")
    print(format_table(bench_models(models, sizes.pop(), devices=devices, batch=a.batch_size, bf16=a.bf16)))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from kdcache.export import export_onnx, keypoint_set_of_model
    from kdcache.models import load_model, model_input_hw

    model = load_model(a.model, expert=a.expert)
    keypoints = keypoint_set_of_model(model, a.keypoint_set, f"model {a.model}")
    diff = export_onnx(model, a.onnx, model_input_hw(model), keypoints)
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

# Environment errors by errno: what to do about them.
OS_ADVICE = {
    errno.ENOSPC: "free some space; completed outputs are kept and the same command goes on from them",
    errno.EDQUOT: "free some space; completed outputs are kept and the same command goes on from them",
    errno.EACCES: "check the permissions, or choose another --out",
    errno.EPERM: "check the permissions, or choose another --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "the path is a folder; pass a file name",
}


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line. A DataLoader worker's error arrives with the worker's traceback
    in its message; its last line is the original error."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith(("Error", "Exception")) \
            else last
    return " ".join(text.split())


def describe_os_error(exc: OSError) -> str:
    """'No space left on device: /path/shard-00003.h5; free some space; ...'"""
    where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    what = exc.strerror or _one_line(exc)
    advice = OS_ADVICE.get(exc.errno, "")
    return "; ".join(part for part in (f"{what}: {where}" if where else what, advice) if part)


def _setup_logging(a: argparse.Namespace) -> None:
    level = logging.DEBUG if a.verbose else logging.WARNING if a.quiet else logging.INFO
    # force: each call logs to the stderr of the moment (main may run many times in one process, as in tests).
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("h5py", "PIL", "matplotlib", "urllib3", "filelock", "fsspec"):  # their DEBUG is not ours
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag (already said in one line)
        return int(exc.code or 0)
    _setup_logging(args)
    prefix = f"kdcache {args.command}: error:"
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prefix} {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except MemoryError as exc:  # also torch.OutOfMemoryError (a RuntimeError) below
        print(f"{prefix} out of memory ({_one_line(exc) or 'host'}); lower --batch-size or --workers", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        print(f"{prefix} out of memory on the device ({_one_line(exc)[:160]}); lower --batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kdcache {args.command}: interrupted; completed outputs are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
