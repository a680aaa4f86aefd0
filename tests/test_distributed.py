"""DDP under torchrun on CPU (gloo, 2 processes): gradients are averaged across ranks.

Two ranks with 2 crops each must take the same step as one process with the same 4 crops: the
weight change of the DDP run matches the single-process change. A rank that trained on its own half
(no gradient averaging) would differ by about as much as the change itself.
"""

import os
import subprocess
import sys

import torch

from kdcache.synth import SynthConfig, synthesize
from kdcache.vitpose import build_vitpose, vitpose_config


def _train(data, out, nproc: int, batch: int) -> None:
    args = ["-m", "kdcache", "train-teacher", "--ann", str(data / "annotations/person_keypoints_train.json"),
            "--images", str(data / "train"), "--out", str(out), "--arch", "vitpose-nano", "--head", "simple",
            "--input-size", "64x64", "--max-steps", "1", "--batch-size", str(batch), "--lr", "1e-2",
            "--warmup-steps", "0", "--workers", "0", "--no-progress"]
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(prefix + args, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_ddp_two_ranks_equal_one_process_on_the_same_crops(tmp_path):
    data = synthesize(SynthConfig(out=tmp_path / "data", train_images=4, val_images=0, seed=5, max_people=1))
    _train(data, tmp_path / "single", nproc=1, batch=4)
    _train(data, tmp_path / "ddp", nproc=2, batch=2)

    torch.manual_seed(0)  # train-teacher's initial weights: seed 0
    init = build_vitpose(vitpose_config("vitpose-nano", head="simple", input_hw=(64, 64))).state_dict()
    single = torch.load(tmp_path / "single/last.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp/last.pt", weights_only=True)
    assert single["step"] == ddp["step"] == 1
    change = sum(float((single["state_dict"][k] - init[k]).norm() ** 2) for k in init) ** 0.5
    gap = sum(float((single["state_dict"][k] - ddp["state_dict"][k]).norm() ** 2) for k in init) ** 0.5
    assert change > 0.1
    assert gap < 0.05 * change, (gap, change)
