"""CPU time of the dumping process per view, with the teacher's forward stubbed out (JSON on stdout):

    python scripts/bench_dump_process.py [--people 512] [--workers 2]
    PYTHONPATH=OLD python scripts/bench_dump_process.py ...   # another kdcache, for a side-by-side comparison

On a GPU the teacher's forward is nearly free (ViTPose-B: 5,400 views/s under bf16 on an H200) and the dump is
bound by the process that feeds it: receiving batches from the loader workers, handing maps to the writer,
encoding and writing shards, all under one GIL (README, On a GPU). This measures that process's CPU time (all its
threads; the loader workers are other processes) per view on any machine, with the forward replaced by fixed
maps of the right shape (17 Gaussian peaks plus noise, so that deflate sees realistic data). The stub's own copy
of the maps is counted too, as the device-to-host copy of the teacher's maps would be.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if not os.environ.get("PYTHONPATH"):  # PYTHONPATH picks the kdcache to measure; else this checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdcache  # noqa: E402
import kdcache.dump as dump_module  # noqa: E402
from kdcache.checkpoint import checkpoint_dict  # noqa: E402
from kdcache.config import DumpConfig, RunConfig  # noqa: E402
from kdcache.synth import SynthConfig, synthesize  # noqa: E402
from kdcache.vitpose import build_vitpose, vitpose_config  # noqa: E402


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process, all its threads; not the workers
    return usage.ru_utime + usage.ru_stime


def fixed_maps(batch: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:48]
    peaks = np.stack([np.exp(-((xx - rng.uniform(5, 43)) ** 2 + (yy - rng.uniform(5, 59)) ** 2) / 8)
                      for _ in range(17)])
    return torch.from_numpy((peaks + rng.normal(0, 0.003, (batch, 17, 64, 48))).astype(np.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--people", type=int, default=512)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp())
    data = synthesize(SynthConfig(out=root / "data", train_images=a.people, val_images=0, seed=0, max_people=1,
                                  workers=max(1, a.workers)))
    torch.manual_seed(0)
    torch.save(checkpoint_dict(build_vitpose(vitpose_config("vitpose-nano", input_hw=(256, 192)))), root / "t.pt")
    maps = fixed_maps(a.batch_size)
    dump_module.predict_heatmaps = lambda teacher, crops, *args, **kwargs: maps[:len(crops)].clone()
    cfg = DumpConfig(teacher=root / "t.pt", ann=data / "annotations/person_keypoints_train.json",
                     images=data / "train", views=a.views, batch_size=a.batch_size,
                     run=RunConfig(out=root / "cache", workers=a.workers, progress=False))
    cpu, wall = process_cpu_s(), time.perf_counter()
    dump_module.dump_teacher(cfg)
    cpu, wall = process_cpu_s() - cpu, time.perf_counter() - wall
    views = a.people * a.views
    print(json.dumps({"kdcache": str(Path(kdcache.__file__).parent), "views": views, "workers": a.workers,
                      "process_cpu_ms_per_view": 1000 * cpu / views, "views_per_s": views / wall}))


if __name__ == "__main__":
    main()
