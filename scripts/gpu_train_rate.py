"""Cached training throughput on a GPU, for comparing two versions of kdcache side by side (JSON on stdout):

    python scripts/gpu_train_rate.py --prepare WORK          # synthetic people and a cache (random ViTPose-S)
    PYTHONPATH=OLD python scripts/gpu_train_rate.py --train WORK --name old
    PYTHONPATH=.   python scripts/gpu_train_rate.py --train WORK --name new

`--train` runs train-student (mobilenetv3_large_100, 256x192, batch 64, every core a loader worker) from the
cache for --epochs and prints the last epoch's crops/s; alternate the versions over rounds (the machine may
drift). Used with a copy of the previous commit's package as OLD.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if "--train" not in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdcache  # noqa: E402
from kdcache.config import DumpConfig, OptimConfig, RunConfig, TrainStudentConfig  # noqa: E402
from kdcache.student import StudentConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prepare", type=Path)
    p.add_argument("--train", type=Path)
    p.add_argument("--name", default="")
    p.add_argument("--people", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-hw", type=int, nargs=2, default=(256, 192))
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    a = p.parse_args()
    hw = tuple(a.input_hw)
    if a.prepare:
        from kdcache.checkpoint import checkpoint_dict
        from kdcache.dump import dump_teacher
        from kdcache.synth import SynthConfig, synthesize
        from kdcache.vitpose import build_vitpose, vitpose_config
        data = synthesize(SynthConfig(out=a.prepare / "data", train_images=a.people, val_images=0, seed=0,
                                      max_people=1, workers=a.workers))
        torch.manual_seed(0)
        torch.save(checkpoint_dict(build_vitpose(vitpose_config("vitpose-s", input_hw=hw))), a.prepare / "t.pt")
        dump_teacher(DumpConfig(teacher=a.prepare / "t.pt", ann=data / "annotations/person_keypoints_train.json",
                                images=data / "train", views=3, batch_size=a.batch_size,
                                run=RunConfig(out=a.prepare / "cache", device=a.device, workers=a.workers,
                                              progress=False)))
        return
    from kdcache.train import train_student
    out = a.train / f"run-{a.name}-{time.time_ns()}"
    start = time.perf_counter()
    train_student(TrainStudentConfig(student=StudentConfig("mobilenetv3_large_100", input_hw=hw),
                                     caches=(a.train / "cache",),
                                     run=RunConfig(out=out, device=a.device, workers=a.workers, progress=False),
                                     optim=OptimConfig(epochs=a.epochs, batch_size=a.batch_size, warmup_steps=1)))
    # Read here, not with bench_train.last_epoch: this script imports only the kdcache under test.
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    last = dict(zip(header.split(","), rows[-1].split(",")))
    print(json.dumps({"name": a.name, "kdcache": str(Path(kdcache.__file__).parent),
                      "last_epoch_crops_per_s": float(last["crops_per_s"]),
                      "epoch_crops_per_s": [float(r.split(",")[5]) for r in rows],
                      "run_seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
