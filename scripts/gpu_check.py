"""What only a GPU can show, in one run of a few minutes (JSON on stdout and in --json-out):

    python scripts/gpu_check.py --json-out gpu_check.json [--teacher TRAINED.pt] [--quick]

1. **bf16 and fp16 against fp32**: the teacher's heatmaps on the same crops under each autocast dtype (the
   dump and online KD run the teacher under bf16 autocast on CUDA): relative L2 per view, and the decoded
   keypoints' difference (argmax + DARK, heatmap pixels; median, p99, max). Peaks of random weights mean
   little, so pass a trained teacher (e.g. the benchmark's `bench_out/teacher/last.pt`) for the decode figures;
   ViTPose-B with random weights is always measured too, for the relative L2 at the released size.
2. **Dump throughput**: `dump_teacher` (ViTPose-B, 256x192, random weights: speed does not depend on them) with
   every CPU core as a loader worker, against the teacher's forward alone on pre-made tensors: views/s, ratio.
3. **Training throughput**: `train_student` (mobilenetv3_large_100, 256x192) from a cache and with ViTPose-B
   online: crops/s of each and the online/cached time ratio, with the CPU cores the machine has.

Runs on the CPU as well (`--device cpu --quick`, to check the script); the figures mean something on a GPU.
Never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import crops_per_s, print_json  # noqa: E402
from kdcache.cache import open_cache  # noqa: E402
from kdcache.checkpoint import checkpoint_dict  # noqa: E402
from kdcache.config import DumpConfig, OptimConfig, RunConfig, TrainStudentConfig  # noqa: E402
from kdcache.dump import dump_teacher  # noqa: E402
from kdcache.heatmap_decode import dark_udp  # noqa: E402
from kdcache.inference import to_input_tensor  # noqa: E402
from kdcache.models import load_model, model_input_hw  # noqa: E402
from kdcache.student import StudentConfig  # noqa: E402
from kdcache.synth import SynthConfig, synthesize  # noqa: E402
from kdcache.train import train_student  # noqa: E402
from kdcache.vitpose import build_vitpose, vitpose_config  # noqa: E402


def precision_agreement(teacher: torch.nn.Module, crops: np.ndarray, device: str, batch: int) -> dict:
    """Heatmaps under bf16 and fp16 autocast against fp32 on the same crops (uint8 [N, H, W, 3])."""
    teacher = teacher.to(device).eval()

    def run(dtype: torch.dtype | None) -> np.ndarray:
        out = []
        for i in range(0, len(crops), batch):
            x = to_input_tensor(crops[i:i + batch]).to(device)
            with torch.inference_mode(), torch.autocast(device_type=torch.device(device).type,
                                                        dtype=dtype or torch.float32, enabled=dtype is not None):
                out.append(teacher(x).float().cpu().numpy())
        return np.concatenate(out)

    reference = run(None)
    ref_xy, ref_score = dark_udp(reference)  # heatmap pixels
    result = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if torch.device(device).type == "cpu" and dtype is torch.float16:
            continue  # CPU autocast is bf16 only
        got = run(dtype)
        rel = np.linalg.norm((got - reference).reshape(len(got), -1), axis=1) / \
            np.linalg.norm(reference.reshape(len(got), -1), axis=1)
        xy, score = dark_udp(got)
        peaked = (ref_score > 0) & (score > 0)  # a map with no positive value decodes to -1: no keypoint
        shift = np.linalg.norm(xy - ref_xy, axis=-1)[peaked]
        result[name] = {"rel_l2_median": float(np.median(rel)), "rel_l2_max": float(rel.max()),
                        "kp_shift_px_median": float(np.median(shift)),
                        "kp_shift_px_p99": float(np.quantile(shift, 0.99)),
                        "kp_shift_px_max": float(shift.max()), "share_over_0.05px": float((shift > 0.05).mean())}
    return result


def forward_rate(teacher: torch.nn.Module, input_hw: tuple[int, int], device: str, batch: int, steps: int) -> float:
    """Views/s of the teacher's forward alone (bf16 autocast on CUDA, as the dump), on pre-made tensors."""
    teacher = teacher.to(device).eval()
    x = torch.randn(batch, 3, *input_hw, device=device)
    kind = torch.device(device).type
    with torch.inference_mode(), torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
        teacher(x)
        if kind == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            teacher(x).float().cpu()
        if kind == "cuda":
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--teacher", type=Path, help="a trained teacher for the decode figures (any kdcache model)")
    p.add_argument("--people", type=int, default=1024, help="synthetic people for the dump and training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()
    arch, input_hw, people = ("vitpose-nano", (128, 96), 16) if a.quick else ("vitpose-b", (256, 192), a.people)
    report: dict = {"device": a.device, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "cpu_cores": os.cpu_count(), "workers": a.workers,
                    "batch_size": a.batch_size, "teacher_arch": arch, "input_hw": list(input_hw)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthesize(SynthConfig(out=root / "data", train_images=people, val_images=0, seed=0, max_people=1,
                                      workers=max(1, a.workers)))
        ann, images = data / "annotations/person_keypoints_train.json", data / "train"
        torch.manual_seed(0)
        torch.save(checkpoint_dict(build_vitpose(vitpose_config(arch, input_hw=input_hw))), root / "teacher.pt")
        run = dict(device=a.device, workers=a.workers, progress=False)

        start = time.perf_counter()
        cache = dump_teacher(DumpConfig(teacher=root / "teacher.pt", ann=ann, images=images, views=4,
                                        batch_size=a.batch_size, run=RunConfig(out=root / "cache", **run)))
        dump_s = time.perf_counter() - start
        rows = open_cache(cache)
        forward = forward_rate(load_model(root / "teacher.pt"), input_hw, a.device, a.batch_size,
                               steps=5 if a.quick else 20)
        report["dump"] = {"views": len(rows), "seconds": dump_s, "views_per_s": len(rows) / dump_s,
                          "forward_views_per_s": forward, "ratio": len(rows) / dump_s / forward}

        crops = np.stack([rows[i]["crop"] for i in range(min(len(rows), 256))])
        report["precision"] = {arch + " (random weights)": precision_agreement(
            load_model(root / "teacher.pt"), crops, a.device, a.batch_size)}
        if a.teacher is not None:
            trained = load_model(a.teacher)
            hw = model_input_hw(trained)
            small = np.stack([cv2.resize(c, (hw[1], hw[0]), interpolation=cv2.INTER_AREA) for c in crops])
            report["precision"][f"{a.teacher} (trained)"] = precision_agreement(trained, small, a.device, a.batch_size)

        student = StudentConfig("mobilenetv3_large_100", input_hw=input_hw)
        optim = OptimConfig(epochs=1, batch_size=a.batch_size, warmup_steps=1)
        rates = {}
        for name, source in (("cached", {"cache": cache}),
                             ("online", {"online_teacher": root / "teacher.pt", "ann": ann, "images": images})):
            out = root / name
            train_student(TrainStudentConfig(student=student, run=RunConfig(out=out, **run), optim=optim, **source))
            rates[name] = crops_per_s(out)
        report["training"] = {"crops_per_s": rates, "online_over_cached_time": rates["cached"] / rates["online"]}
    print_json(report, a.json_out)


if __name__ == "__main__":
    main()
