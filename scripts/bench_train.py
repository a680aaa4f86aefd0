"""Training speed, side by side: cached KD vs targets in memory vs the teacher run online.

    python scripts/bench_train.py [--student mobilenetv3_large_100] [--teachers vitpose-s vitpose-b]
                                  [--instances 256] [--batch-size 16] [--rounds 2] [--json-out R.json]

All runs go through kdcache's own training loop (`kdcache.train.fit`: DataLoader, loss, AdamW step), one
epoch each over the same instances, at 256x192, alternating arms round by round (this machine is shared),
reporting the median crops/s of each arm and the median of the per-round ratios:

    cached     train-student from a cache (crops and heatmaps decoded in DataLoader workers)
    memory     the same items, already decoded in memory (no reading at all): the ceiling for `cached`
    online T   train-student with teacher T run every step on freshly warped crops (random weights:
               speed does not depend on them)

and, on pre-made tensors in one process, the physical limit of the online/cached ratio:
(teacher forward + student step) / student step. Results are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache import train as train_mod  # noqa: E402
from kdcache.cache import open_cache  # noqa: E402
from kdcache.checkpoint import checkpoint_dict  # noqa: E402
from kdcache.config import (DumpConfig, OptimConfig, RunConfig, TrainStudentConfig,  # noqa: E402
                            ValConfig, to_jsonable)
from kdcache.data import CachedDataset  # noqa: E402
from kdcache.dump import dump_teacher  # noqa: E402
from kdcache.keypoints import COCO_17  # noqa: E402
from kdcache.losses import KDConfig, distillation_loss  # noqa: E402
from kdcache.sources import CachedKD  # noqa: E402
from kdcache.student import StudentConfig, build_student  # noqa: E402
from kdcache.synth import SynthConfig, synthesize  # noqa: E402
from kdcache.vitpose import build_vitpose, vitpose_config  # noqa: E402

INPUT_HW = (256, 192)


class InMemory(Dataset):
    """The cached dataset's items for one epoch, decoded once up front."""

    def __init__(self, source: CachedDataset):
        self.items = [source[i] for i in range(len(source))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def last_epoch(run_dir: Path) -> dict[str, float | int | None]:
    """A training run's last metrics.csv row: crops/s and seconds of its last epoch (loader start included), the
    number of epochs, and the epoch's validation AP (None when it did not validate)."""
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    row = dict(zip(header.split(","), rows[-1].split(",")))
    return {"crops_per_s": float(row["crops_per_s"]), "epoch_seconds": float(row["seconds"]),
            "epochs": len(rows), "val_AP": float(row["val_AP"]) if row.get("val_AP") else None}


def crops_per_s(run_dir: Path) -> float:
    return last_epoch(run_dir)["crops_per_s"]


def print_json(report: dict, path: Path | None) -> None:
    """The report on stdout and, when given, in `path`."""
    text = json.dumps(report, indent=1)
    print(text)
    if path:
        path.write_text(text)


def time_call(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def physical_limit(student_name: str, teacher_arch: str, batch: int) -> dict[str, float]:
    """Seconds per crop of the teacher forward and of the student step, on pre-made tensors."""
    x = torch.randn(batch, 3, *INPUT_HW)
    teacher = build_vitpose(vitpose_config(teacher_arch, input_hw=INPUT_HW)).eval()
    with torch.inference_mode():
        forward = time_call(lambda: teacher(x)) / batch
    student = build_student(StudentConfig(student_name, input_hw=INPUT_HW), load_pretrained=False).train()
    opt = torch.optim.AdamW(student.parameters())
    k = COCO_17.num_keypoints
    target = torch.rand(batch, k, INPUT_HW[0] // 4, INPUT_HW[1] // 4)

    def step() -> None:
        opt.zero_grad()
        loss = distillation_loss(student(x), target, target, torch.ones(batch, k), KDConfig(alpha=0.5))
        loss.backward()
        opt.step()

    step_s = time_call(step) / batch
    return {"teacher_forward_s_per_crop": forward, "student_step_s_per_crop": step_s,
            "limit_ratio": (forward + step_s) / step_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="mobilenetv3_large_100")
    p.add_argument("--teachers", nargs="*", default=["vitpose-s", "vitpose-b"],
                   help="online teachers to compare (none: only cached vs memory)")
    p.add_argument("--instances", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthesize(SynthConfig(out=root / "data", train_images=a.instances, val_images=0, seed=0,
                                      max_people=1, workers=max(1, a.workers)))
        ann, images = data / "annotations/person_keypoints_train.json", data / "train"
        quiet = dict(workers=a.workers, progress=False, overwrite=True)  # rounds reuse run folders
        for arch in {"vitpose-nano", *a.teachers}:
            torch.manual_seed(0)
            torch.save(checkpoint_dict(build_vitpose(vitpose_config(arch, input_hw=INPUT_HW)), epoch=0, step=0),
                       root / f"{arch}.pt")
        # The cache's teacher only decides the heatmaps' content; reading speed is what is measured here.
        cache = dump_teacher(DumpConfig(teacher=root / "vitpose-nano.pt", ann=ann, images=images, views=2,
                                        run=RunConfig(out=root / "cache", **quiet)))
        optim = OptimConfig(epochs=1, batch_size=a.batch_size, warmup_steps=1)
        student = StudentConfig(a.student, input_hw=INPUT_HW)

        def train(name: str, **source) -> float:
            out = root / name
            train_mod.train_student(TrainStudentConfig(student=student, run=RunConfig(out=out, **quiet),
                                                       optim=optim, **source))
            return crops_per_s(out)

        memory_items = InMemory(CachedDataset(open_cache(cache), 0.5, 0))

        def train_memory() -> float:
            out = root / "memory"
            torch.manual_seed(0)
            model = build_student(student)
            # The cached arm's loss (train-student --cache), on items already in memory.
            train_mod.fit(model, CachedKD(memory_items, KDConfig(alpha=0.5)), optim,
                          RunConfig(out=out, workers=0, progress=False, overwrite=True),
                          ValConfig(), to_jsonable(optim))
            return crops_per_s(out)

        arms = {"cached": lambda: train("cached", caches=(cache,)), "memory": train_memory,
                **{f"online {t}": (lambda t=t: train(f"online-{t}", online_teacher=root / f"{t}.pt", ann=ann,
                                                     images=images)) for t in a.teachers}}
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(a.rounds):
            for name, fn in arms.items():
                rates[name].append(fn())
                print(f"round {r + 1}: {name} {rates[name][-1]:.2f} crops/s", file=sys.stderr, flush=True)
        median = {name: statistics.median(v) for name, v in rates.items()}
        report = {
            "student": a.student, "input_hw": list(INPUT_HW), "instances": a.instances, "batch_size": a.batch_size,
            "workers": a.workers, "threads": torch.get_num_threads(), "rounds": a.rounds,
            "crops_per_s": rates, "median_crops_per_s": median,
            # Ratios per round (arms run back to back), then their median: steadier on a shared machine.
            "cached_over_memory": statistics.median(c / m for c, m in zip(rates["cached"], rates["memory"])),
            "online_over_cached_time": {t: statistics.median(c / o for c, o in zip(rates["cached"],
                                                                                     rates[f"online {t}"]))
                                        for t in a.teachers},
            "physical_limit": {t: physical_limit(a.student, t, a.batch_size) for t in a.teachers},
        }
    print_json(report, a.json_out)


if __name__ == "__main__":
    main()
