"""The `kdcache` command line's flags: one argparse parser, every flag with its help and default, an example
per command, and value checks that refuse bad numbers before any work starts.

`kdcache.cli` parses argv with it and turns the namespace into stage configs; nothing else imports this.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

from kdcache import __version__
from kdcache.augment import StudentAugConfig
from kdcache.bench import BENCH_BATCH
from kdcache.cache_format import CROP_FORMATS, parse_crop_format
from kdcache.coco import PERSONS
from kdcache.config import (DumpConfig, EvalConfig, OptimConfig, RunConfig, TrainStudentConfig, TrainTeacherConfig,
                            ValConfig)
from kdcache.heatmap_storage import HEATMAP_STORAGES
from kdcache.inspect_cache import SHEET_VIEWS
from kdcache.losses import KD_LOSSES, KDConfig
from kdcache.optim import SCHEDULES
from kdcache.student import HEADS as STUDENT_HEADS, StudentConfig
from kdcache.synth import SYNTH_SETS, SynthConfig
from kdcache.transforms import AugmentConfig
from kdcache.vitpose import HEADS as VITPOSE_HEADS


def default(config: type, name: str) -> Any:
    """A config dataclass field's default: flags take their defaults from the one place they are defined."""
    found = {f.name: f for f in dataclasses.fields(config)}[name]
    return found.default if found.default is not dataclasses.MISSING else found.default_factory()

# train-student probability flags -> StudentAugConfig fields, with what each one does.
STUDENT_AUG_FLAGS = (
    ("color", "color_prob", "brightness/contrast/saturation"),
    ("blur", "blur_prob", "Gaussian blur"),
    ("noise", "noise_prob", "Gaussian pixel noise"),
    ("grayscale", "gray_prob", "grayscale"),
    ("occlusion", "occlusion_prob", "random occluding rectangles"),
    ("jitter", "jitter_prob", "cached views: extra rotation/scale/shift of crop and heatmaps together"),
)

# View augmentation flags (ViTPose's top-down pipeline) -> AugmentConfig fields, with what each one sets.
VIEW_AUG_FLAGS = (
    ("flip-prob", "flip_prob", float, "probability of a horizontal mirror"),
    ("half-body-prob", "half_body_prob", float, "probability of a half-body crop"),
    ("half-body-min-joints", "half_body_min_joints", int, "half-body only with more labelled joints than this"),
    ("scale-factor", "scale_factor", float, "scale x clip(N(1, sf), 1-sf, 1+sf)"),
    ("rot-factor", "rot_factor", float, "rotation clip(N(0, rf), -2rf, 2rf) degrees"),
    ("rot-prob", "rot_prob", float, "probability of the rotation"),
    ("shift-factor", "shift_factor", float, "center shift by U(-1, 1) x this x box size"),
    ("shift-prob", "shift_prob", float, "probability of the center shift"),
)
VIEW_AUG_PROBS = {"flip_prob", "half_body_prob", "rot_prob", "shift_prob"}

EXAMPLES = {
    "synth": "kdcache synth --out data --train-images 1500 --val-images 150 --max-people 1 --clutter 0.3",
    "train-teacher": "kdcache train-teacher --ann data/annotations/person_keypoints_train.json --images data/train "
                     "--out runs/teacher --arch vitpose-tiny --input-size 128x96 --epochs 50",
    "dump-teacher": "kdcache dump-teacher --teacher vitpose-b.pth "
                    "--ann coco/annotations/person_keypoints_train2017.json "
                    "--images coco/train2017 --out cache --views 8 --device cuda\n"
                    "  kdcache dump-teacher --teacher vitpose-b.pth "
                    "--ann coco/annotations/image_info_unlabeled2017.json "
                    "--boxes unlabeled2017_person_dets.json --box-score-thr 0.5 --images coco/unlabeled2017 "
                    "--out cache-u --device cuda",
    "train-student": "kdcache train-student --cache cache --student mobilenetv3_large_100 --out runs/mnv3 --epochs 210 "
                     "--val-ann coco/annotations/person_keypoints_val2017.json --val-images coco/val2017\n"
                     "  kdcache train-student --cache cache --cache cache-u --cache-weight 1 --cache-weight 0.5 "
                     "--student mobilenetv3_large_100 --out runs/mnv3-u --epochs 210",
    "eval": "kdcache eval --model runs/mnv3/best.pt --ann coco/annotations/person_keypoints_val2017.json "
            "--images coco/val2017 --boxes person_detection_results.json --flip-test\n"
            "  kdcache eval --results my_results.json --ann coco/annotations/person_keypoints_val2017.json",
    "inspect": "kdcache inspect cache --verify --png cache.png",
    "bench": "kdcache bench runs/mnv3/best.pt vitpose-b.pth --device cpu,cuda",
    "export": "kdcache export --model runs/mnv3/best.pt --onnx mnv3.onnx",
    "demo": "kdcache demo --out demo_out",
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong and where help is, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default after its help; examples (the epilog) kept as written. A None default is not
    shown: those flags say in their help what leaving them out means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: `kind(text)` within [low, high] (open ends as given)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or (low is not None and (value < low or (low_open and value == low))) or \
                (high is not None and (value > high or (high_open and value == high))):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(x for x in (lo, hi) if x)}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)
POSITIVE = _number(float, 0, low_open=True)
NON_NEGATIVE = _number(float, 0)
PROBABILITY = _number(float, 0, 1)
UNIT_OPEN = _number(float, 0, 1, high_open=True)


def size_hw(text: str) -> tuple[int, int]:
    """'256x192' -> (256, 192): crop height x width."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x192, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"crop size {text} must be positive multiples of 32 (e.g. 256x192, 128x96)")
    return h, w


def expert(text: str) -> str | int:
    """A ViTPose++ expert: a dataset name ('coco', 'aic', ...) or its index."""
    return int(text) if text.isdigit() else text


def _expert_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert", type=expert, help="ViTPose++ expert by dataset name or index (None: coco)")


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=default(RunConfig, "device"), help="cpu, cuda or cuda:N")


def _workers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=COUNT, default=default(RunConfig, "workers"),
                   help="DataLoader worker processes (0: load in the main process)")


def _common(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _device_flag(p)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=batch, help="crops per batch")
    _workers_flag(p)
    p.add_argument("--seed", type=COUNT, default=default(RunConfig, "seed"),
                   help="random seed: every random choice derives from it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also off when stderr is not a "
                   "terminal)")


def _data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--ann", type=Path, required=required, help="COCO person_keypoints_*.json")
    p.add_argument("--images", type=Path, required=required, help="folder of the annotation file's images")
    _keypoint_set_flag(p)


def _keypoint_set_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keypoint-set", metavar="NAME|FILE", help="the keypoint set of annotation files that do not "
                   "name theirs: a built-in one (coco-17, coco-wholebody-133, crowdpose-14, aic-14, mpii-16, "
                   "ap10k-17) or a JSON file describing yours (names, flip pairs, skeleton, sigmas)")


def _optim(p: argparse.ArgumentParser, optim: OptimConfig) -> None:
    p.add_argument("--epochs", type=POSITIVE_INT, default=optim.epochs, help="passes over the training set")
    p.add_argument("--max-steps", type=COUNT, default=optim.max_steps,
                   help="stop after N optimiser steps (0: no bound)")
    p.add_argument("--lr", type=POSITIVE, default=optim.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=optim.weight_decay, help="AdamW decoupled weight decay")
    p.add_argument("--warmup-steps", type=COUNT, default=optim.warmup_steps, help="linear warm-up steps")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default=optim.schedule,
                   help="learning-rate decay: cosine to 0, or x0.1 at 81%% and 95%% of the run")
    p.add_argument("--ema", type=UNIT_OPEN, default=optim.ema, help="EMA decay of the weights, e.g. 0.999 (0: off)")
    p.add_argument("--val-ann", type=Path, help="validation annotation file: AP every --val-every epochs, best.pt")
    p.add_argument("--val-images", type=Path, help="validation images folder")
    p.add_argument("--val-every", type=POSITIVE_INT, default=default(ValConfig, "every"),
                   help="validate every N epochs (and after the last)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (its "
                     "last.pt, best.pt, metrics.csv, config.json go)")


def _view_aug(p: argparse.ArgumentParser, note: str = "") -> None:
    """ViTPose's view augmentation; defaults None so that a command can tell which flags were given."""
    defaults = AugmentConfig()
    group = p.add_argument_group("view augmentation (ViTPose's top-down pipeline)" + note)
    for flag, field, kind, what in VIEW_AUG_FLAGS:
        check = PROBABILITY if field in VIEW_AUG_PROBS else COUNT if kind is int else NON_NEGATIVE
        group.add_argument(f"--{flag}", type=check, default=None, metavar="P" if field in VIEW_AUG_PROBS else "X",
                           help=f"{what} (default: {getattr(defaults, field)})")


def _synth_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="dataset root")
    p.add_argument("--train-images", type=COUNT, default=default(SynthConfig, "train_images"), help="training images")
    p.add_argument("--val-images", type=COUNT, default=default(SynthConfig, "val_images"), help="validation images")
    p.add_argument("--unlabelled-images", type=COUNT, default=default(SynthConfig, "unlabelled_images"),
                   help="unlabelled images, with a simulated detector's person boxes (0: no unlabelled split)")
    p.add_argument("--seed", type=COUNT, default=default(SynthConfig, "seed"),
                   help="random seed (same seed: byte-identical files)")
    p.add_argument("--workers", type=POSITIVE_INT, default=default(SynthConfig, "workers"),
                   help="processes (output is the same for any value)")
    p.add_argument("--max-people", type=_number(int, 1, 4), default=default(SynthConfig, "max_people"),
                   help="people per image drawn from 1..P")
    p.add_argument("--clutter", type=NON_NEGATIVE, default=default(SynthConfig, "clutter"),
                   help="background distractors (0: none)")
    p.add_argument("--keypoint-set", choices=SYNTH_SETS, default=default(SynthConfig, "keypoint_set"),
                   help="what is labelled: COCO's 17, or COCO-WholeBody's 133 (feet, face, hands) in its layout")


def _train_teacher_flags(p: argparse.ArgumentParser) -> None:
    _data(p)
    teacher_optim = default(TrainTeacherConfig, "optim")
    _common(p, batch=teacher_optim.batch_size)
    _optim(p, teacher_optim)
    p.add_argument("--arch", default=default(TrainTeacherConfig, "arch"),
                   help="vitpose-s/b/l/h, tokenpose-t/s/s-v2/b/l, or vitpose-tiny/nano, tokenpose-nano for CPU")
    p.add_argument("--head", choices=tuple(VITPOSE_HEADS), default=default(TrainTeacherConfig, "head"),
                   help="ViTPose head: deconvolution or bilinear")
    p.add_argument("--input-size", type=size_hw, default=default(TrainTeacherConfig, "input_hw"), help="crop HxW")
    _view_aug(p)


def _dump_teacher_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint")
    _data(p)
    p.add_argument("--boxes", type=Path, help="COCO detection results: dump these people, without ground truth, "
                   "on --ann's images (--ann may then be an image-info file, e.g. image_info_unlabeled2017.json)")
    p.add_argument("--box-score-thr", type=PROBABILITY, default=default(DumpConfig, "box_score_thr"),
                   help="--boxes: drop detections below this score")
    p.add_argument("--persons", choices=tuple(PERSONS), default=default(DumpConfig, "persons"),
                   help="which of --ann's people: with labelled keypoints (as ViTPose trains), the boxes without "
                        "keypoints (dumped without ground truth), or all")
    _common(p, batch=default(DumpConfig, "batch_size"))
    crop_kind, jpeg_quality = parse_crop_format(default(DumpConfig, "crop_format"))
    p.add_argument("--views", type=POSITIVE_INT, default=default(DumpConfig, "views"),
                   help="views per instance; view 0 is un-augmented (the benchmark: about epochs/16 training views "
                        "with the default --jitter, epochs/4 without)")
    p.add_argument("--shard-size", type=POSITIVE_INT, default=default(DumpConfig, "shard_size"), help="views per shard")
    p.add_argument("--crop", choices=CROP_FORMATS, default=crop_kind,
                   help="crop codec; 'none' stores no crops (training replays them from the images with the "
                        "stored affine)")
    p.add_argument("--jpeg-quality", type=_number(int, 1, 100), default=jpeg_quality, help="crop JPEG quality")
    p.add_argument("--heatmap-encoding", choices=tuple(HEATMAP_STORAGES),
                   default=default(DumpConfig, "heatmap_storage"), help="how teacher heatmaps are stored")
    p.add_argument("--heatmap-error", type=POSITIVE, default=default(DumpConfig, "heatmap_rel_error"),
                   help="int16-step(-window): relative L2 error of each stored heatmap (of its window)")
    p.add_argument("--gzip-level", type=int, default=default(DumpConfig, "gzip_level"), choices=range(1, 10),
                   metavar="1..9", help="deflate level of the heatmap chunks")
    p.add_argument("--teacher-flip", action="store_true",
                   help="store the mean of the teacher on the crop and on its mirror (2x teacher time)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="go on past missing or unreadable images and list them in manifest.json")
    p.add_argument("--verify", action="store_true", help="on resume, also check the SHA-256 of every shard "
                   "already written (sizes are always checked); bad shards are rewritten")
    _expert_flag(p)
    _view_aug(p)


def _train_student_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, action="append", help="teacher cache from dump-teacher; repeat it to train "
                   "on several at once (e.g. a labelled cache and one dumped from detector boxes)")
    p.add_argument("--cache-weight", type=POSITIVE, action="append", metavar="W",
                   help="one per --cache, in order: how many times each person of that cache is drawn per epoch "
                        "(default 1: an epoch is every person of every cache once; 0.5: a fresh half each epoch)")
    p.add_argument("--online-teacher", type=Path, help="baseline: run this teacher every step instead")
    _expert_flag(p)
    _data(p, required=False)
    p.add_argument("--student", required=True, help="timm backbone name, e.g. mobilenetv3_large_100")
    p.add_argument("--head", choices=tuple(STUDENT_HEADS), default=default(StudentConfig, "head"), help="heatmap head")
    p.add_argument("--head-channels", type=POSITIVE_INT, default=default(StudentConfig, "head_channels"),
                   help="width of the head's blocks")
    p.add_argument("--pretrained", default=default(StudentConfig, "pretrained"), help="'timm' (ImageNet weights "
                   "through timm's cache, downloaded there if missing) or a weights file ('': random init)")
    hw = default(StudentConfig, "input_hw")
    p.add_argument("--input-size", type=size_hw, default=None,
                   help=f"crop HxW (None: the cache's, else {hw[0]}x{hw[1]})")
    student_optim = default(TrainStudentConfig, "optim")
    _common(p, batch=student_optim.batch_size)
    _optim(p, student_optim)
    p.add_argument("--alpha", type=PROBABILITY, default=default(KDConfig, "alpha"),
                   help="teacher-loss weight; 1-alpha on ground truth")
    p.add_argument("--kd-loss", choices=tuple(KD_LOSSES), default=default(KDConfig, "loss"),
                   help="teacher term: heatmap MSE, or KL of spatially softmaxed heatmaps")
    p.add_argument("--kd-temperature", type=POSITIVE, default=default(KDConfig, "temperature"),
                   help="--kd-loss kl: softmax temperature")
    p.add_argument("--train-views", type=COUNT, default=default(TrainStudentConfig, "train_views"), metavar="K",
                   help="train on the cache's first K augmented views only, epoch e reading view 1 + e mod K "
                        "(0: all of them)")
    p.add_argument("--view-seed", type=COUNT, default=None, help="online and ground-truth runs: draw the views "
                   "from this seed instead of --seed (a dump's --seed gives the views its cache holds)")
    p.add_argument("--confidence-weights", action="store_true",
                   help="weight each joint's teacher term by the teacher's confidence (its peak)")
    p.add_argument("--box-score-weights", action="store_true",
                   help="weight each row's teacher term by its person box's score (a detector's; 1 for annotated "
                        "people)")
    for flag, field, what in STUDENT_AUG_FLAGS:
        auto = flag == "jitter"  # on by default where the benchmark shows it pays: replayed cached views
        p.add_argument(f"--{flag}", type=PROBABILITY, default=None if auto else default(StudentAugConfig, field),
                       metavar="P",
                       help=f"probability of {what} on the student's crop (0: off" +
                            ("; None: 0.5 when the run replays cached views, i.e. --epochs exceeds the training "
                             "views, else 0)" if auto else ")"))
    _view_aug(p, note="; with --cache only --flip-prob applies: the train-time mirror of cached views")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="checkpoint of any kind")
    source.add_argument("--results", type=Path, help="score this COCO keypoint results file as given (no model)")
    p.add_argument("--ann", type=Path, required=True, help="COCO person_keypoints_*.json (ground truth)")
    p.add_argument("--images", type=Path, help="folder of the annotation file's images (with --model)")
    _keypoint_set_flag(p)
    p.add_argument("--boxes", type=Path, help="COCO detection results (None: ground-truth boxes)")
    p.add_argument("--box-score-thr", type=PROBABILITY, default=default(EvalConfig, "box_score_thr"),
                   help="drop detections below this score")
    p.add_argument("--flip-test", action="store_true", help="average with the mirrored crop")
    p.add_argument("--metrics-out", type=Path, help="write the metrics as JSON")
    p.add_argument("--results-out", type=Path, help="write the keypoint results in COCO results format")
    p.add_argument("--vis", type=Path, metavar="DIR",
                   help="write PNGs of the predictions (orange, score >= 0.3) over the ground truth (green)")
    p.add_argument("--vis-count", type=POSITIVE_INT, default=default(EvalConfig, "vis_count"),
                   help="images drawn by --vis")
    _expert_flag(p)
    _device_flag(p)
    predict = default(EvalConfig, "predict")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=predict.batch_size, help="crops per batch")
    p.add_argument("--workers", type=COUNT, default=predict.workers,
                   help="DataLoader worker processes (0: load in the main process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _inspect_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", type=Path, help="cache folder")
    p.add_argument("--verify", action="store_true", help="check every shard's size, SHA-256 and rows")
    p.add_argument("--png", type=Path, help="write a contact sheet of crops with their heatmaps")
    p.add_argument("--count", type=POSITIVE_INT, default=SHEET_VIEWS, help="views on the contact sheet")


def _bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", type=Path, nargs="+", help="checkpoints of any kind")
    _expert_flag(p)
    p.add_argument("--device", help="comma-separated devices, side by side, e.g. cpu,cuda (None: cpu, plus cuda "
                   "when available)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=BENCH_BATCH, help="throughput batch")
    p.add_argument("--bf16", action="store_true", help="time CUDA under bf16 autocast (CPU stays fp32)")


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="checkpoint of any kind")
    p.add_argument("--onnx", type=Path, required=True, help="ONNX file to write")
    _expert_flag(p)
    _keypoint_set_flag(p)


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="demo folder")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) that checks the plumbing only")


# Each command: its one-line help and the function that adds its flags (in `kdcache --help` order).
COMMAND_FLAGS = {
    "synth": ("write a synthetic dataset in COCO person-keypoints layout", _synth_flags),
    "train-teacher": ("train a ViTPose or TokenPose model on ground truth", _train_teacher_flags),
    "dump-teacher": ("stage 1: teacher heatmaps of K views per instance -> cache", _dump_teacher_flags),
    "train-student": ("stage 2: train a student from the cache (or online, or on ground truth only when neither "
                      "--cache nor --online-teacher is given)", _train_student_flags),
    "eval": ("stage 3: COCO keypoint AP of any checkpoint, or of an existing results file", _eval_flags),
    "inspect": ("summary of a cache; --verify checks it; --png draws a contact sheet", _inspect_flags),
    "bench": ("params, GFLOPs, latency and throughput side by side", _bench_flags),
    "export": ("ONNX export checked against PyTorch, with the preprocessing in its metadata", _export_flags),
    "demo": ("the whole pipeline on synthetic data, ending in one table", _demo_flags),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kdcache", formatter_class=HelpFormatter,
                    description="Distil ViTPose into small pose networks from a cached teacher pass.")
    parser.add_argument("--version", action="version", version=f"kdcache {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_flags) in COMMAND_FLAGS.items():
        add_flags(sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                                 epilog=f"example:\n  {EXAMPLES[name]}"))
    return parser
