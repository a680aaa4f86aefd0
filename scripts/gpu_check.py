"""What only a GPU can show, in one run of about five minutes (JSON in --json-out, rewritten after each section):

    python scripts/gpu_check.py --json-out gpu_check.json [--people 4096] [--budget-s 420]

1. **A trained teacher** (`train_teacher`, vitpose-tiny at 128x96 on synthetic people, a few epochs): crops/s
   of teacher training on the GPU, and its validation AP; its heatmaps give the decode figures of 2.
2. **bf16 and fp16 against fp32**: the teacher's heatmaps on the same crops under each autocast dtype (the
   dump, prediction and training run under bf16 autocast on CUDA): relative L2 per view and the decoded
   keypoints' shift (argmax + DARK, heatmap pixels; median, p99, max), for the trained teacher and for
   ViTPose-B with random weights (the relative L2 at the released size; its random peaks mean little).
3. **Dump throughput**: `dump_teacher` (ViTPose-B, 256x192, random weights: speed does not depend on them)
   with every CPU core as a loader worker, against the teacher's forward alone on pre-made tensors.
4. **Training throughput**: `train_student` (mobilenetv3_large_100, 256x192) from that cache and with
   ViTPose-B run online, against the student's own step on pre-made GPU tensors (the ceiling).
5. **Model speed** (`kdcache bench`'s `bench_models`): ViTPose-S/B/L/H and two students on the GPU, fp32 and
   bf16, batch 1 latency and batch throughput.

Each section is timed and guarded: an error is recorded in the JSON and the next section runs; a section that
would start after --budget-s is skipped. Runs on the CPU as well (`--device cpu --quick`, to check the script).
DDP with nccl needs two GPUs (NCCL refuses two ranks on one device), so a one-GPU machine cannot check it.
Never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import last_epoch  # noqa: E402
from kdcache.bench import bench_models  # noqa: E402
from kdcache.cache import open_cache  # noqa: E402
from kdcache.checkpoint import checkpoint_dict  # noqa: E402
from kdcache.config import (DumpConfig, EvalConfig, OptimConfig, RunConfig, TrainStudentConfig,  # noqa: E402
                            TrainTeacherConfig, ValConfig)
from kdcache.demo import DEMO_AUG  # noqa: E402
from kdcache.dump import dump_teacher  # noqa: E402
from kdcache.evaluate import evaluate  # noqa: E402
from kdcache.heatmap_decode import dark_udp  # noqa: E402
from kdcache.inference import to_input_tensor  # noqa: E402
from kdcache.losses import KDConfig  # noqa: E402
from kdcache.models import load_model, model_input_hw  # noqa: E402
from kdcache.predict import PredictConfig  # noqa: E402
from kdcache.student import StudentConfig, build_student  # noqa: E402
from kdcache.synth import SynthConfig, synthesize  # noqa: E402
from kdcache.train import train_student, train_teacher  # noqa: E402
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
    result: dict[str, Any] = {"crops": len(crops), "median_peak_fp32": float(np.median(reference.max(axis=(2, 3))))}
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


def synced(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def forward_rate(teacher: torch.nn.Module, input_hw: tuple[int, int], device: str, batch: int, steps: int) -> float:
    """Views/s of the teacher's forward alone (bf16 autocast on CUDA, as the dump), on pre-made tensors, the
    heatmaps brought back to the CPU as the dump does."""
    teacher = teacher.to(device).eval()
    x = torch.randn(batch, 3, *input_hw, device=device)
    kind = torch.device(device).type
    with torch.inference_mode(), torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
        for _ in range(2):
            teacher(x)
        synced(device)
        start = time.perf_counter()
        for _ in range(steps):
            teacher(x).float().cpu()
        synced(device)
    return batch * steps / (time.perf_counter() - start)


def student_step_rate(student: StudentConfig, device: str, batch: int, steps: int) -> float:
    """Crops/s of the student's training step alone (forward, MSE to fixed maps, backward, AdamW; bf16 autocast
    on CUDA, as train-student) on pre-made tensors: the ceiling of any training run's throughput."""
    model = build_student(student, load_pretrained=False).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, *student.input_hw, device=device)
    kind = torch.device(device).type
    with torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
        target = torch.zeros_like(model(x), dtype=torch.float32)

    def step() -> None:
        with torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
            loss = torch.nn.functional.mse_loss(model(x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    synced(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synced(device)
    return batch * steps / (time.perf_counter() - start)


class Report:
    """The JSON report, written after every section; a section's error is recorded and the next one runs."""

    def __init__(self, path: Path | None, budget_s: float, **header: Any):
        self.path, self.budget_s, self.start = path, budget_s, time.perf_counter()
        self.data: dict[str, Any] = dict(header)

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.budget_s:
            self.data[name] = {"skipped": f"{elapsed:.0f} s into the run, past --budget-s {self.budget_s:.0f}"}
            self.write()
            return None
        print(f"[{elapsed:6.1f} s] {name}", flush=True)
        begin = time.perf_counter()
        try:
            result = fn()
            self.data[name] = {"seconds": round(time.perf_counter() - begin, 1), **result}
        except Exception as e:  # a prepared device run: record it and go on to the next section
            result = None
            self.data[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        self.write()
        return result

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        text = json.dumps(self.data, indent=1)
        if self.path:
            self.path.write_text(text)
        else:
            print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--people", type=int, default=4096, help="synthetic people for the teacher, dump and training")
    p.add_argument("--views", type=int, default=4, help="views per person in the ViTPose-B cache")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--budget-s", type=float, default=420, help="start no section after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on a CPU")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()
    big, big_hw, people, val = ("vitpose-nano", (128, 96), 48, 16) if a.quick else ("vitpose-b", (256, 192),
                                                                                   a.people, 256)
    gpu = torch.cuda.is_available()
    report = Report(a.json_out, a.budget_s, device=a.device, gpu=torch.cuda.get_device_name() if gpu else None,
                    torch=torch.__version__, cuda=torch.version.cuda, cpu_cores=os.cpu_count(), workers=a.workers,
                    batch_size=a.batch_size, people=people, views=a.views, big_teacher=big,
                    big_input_hw=list(big_hw), tf32={"matmul": torch.backends.cuda.matmul.allow_tf32,
                                                     "cudnn": torch.backends.cudnn.allow_tf32})
    run = dict(device=a.device, workers=a.workers, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        ann, images = data / "annotations/person_keypoints_train.json", data / "train"
        val_ann, val_images = data / "annotations/person_keypoints_val.json", data / "val"
        report.section("synth", lambda: {"path": str(synthesize(SynthConfig(
            out=data, train_images=people, val_images=val, seed=0, max_people=1, workers=max(1, a.workers))))})

        def trained_teacher() -> dict:
            out = root / "trained"
            train_teacher(TrainTeacherConfig(
                ann=ann, images=images, run=RunConfig(out=out, **run), arch="vitpose-tiny", input_hw=(128, 96),
                aug=DEMO_AUG, val=ValConfig(ann=val_ann, images=val_images, every=a.teacher_epochs),
                optim=OptimConfig(epochs=2 if a.quick else a.teacher_epochs, batch_size=a.batch_size, lr=1e-3,
                                  weight_decay=0.05, warmup_steps=100)))
            return {"arch": "vitpose-tiny", "input_hw": [128, 96], **last_epoch(out)}
        report.section("teacher_training", trained_teacher)
        trained = root / "trained/last.pt"

        torch.manual_seed(0)
        torch.save(checkpoint_dict(build_vitpose(vitpose_config(big, input_hw=big_hw))), root / "big.pt")

        def dump() -> dict:
            start = time.perf_counter()
            cache = dump_teacher(DumpConfig(teacher=root / "big.pt", ann=ann, images=images, views=a.views,
                                            batch_size=a.batch_size, run=RunConfig(out=root / "cache", **run)))
            seconds = time.perf_counter() - start
            views = len(open_cache(cache))
            forward = forward_rate(load_model(root / "big.pt"), big_hw, a.device, a.batch_size,
                                   steps=5 if a.quick else 40)
            return {"teacher": big, "views": views, "dump_views_per_s": views / seconds,
                    "forward_views_per_s": forward, "ratio": views / seconds / forward}
        report.section("dump", dump)

        def precision() -> dict:
            rows = open_cache(root / "cache")
            crops = np.stack([rows[i]["crop"] for i in range(min(len(rows), 512))])
            result = {f"{big} (random weights)": precision_agreement(load_model(root / "big.pt"), crops, a.device,
                                                                     a.batch_size)}
            if trained.exists():
                hw = model_input_hw(load_model(trained))
                small = np.stack([cv2.resize(c, (hw[1], hw[0]), interpolation=cv2.INTER_AREA) for c in crops])
                result["vitpose-tiny (trained, section teacher_training)"] = precision_agreement(
                    load_model(trained), small, a.device, a.batch_size)
            return result
        report.section("precision", precision)

        def trained_eval() -> dict:  # on CUDA, prediction runs under bf16 autocast (kdcache.inference)
            metrics = evaluate(EvalConfig(model=trained, ann=val_ann, images=val_images, device=a.device,
                                          predict=PredictConfig(workers=a.workers)))
            return {"AP": metrics["AP"], "AP50": metrics["AP50"]}
        report.section("teacher_eval", trained_eval)

        def training() -> dict:
            student = StudentConfig("mobilenetv3_large_100", input_hw=big_hw)
            optim = OptimConfig(epochs=2 if a.quick else 3, batch_size=a.batch_size, warmup_steps=1)
            result: dict[str, Any] = {"student": student.backbone}
            for name, source in (("cached", {"caches": (root / "cache",)}),
                                 ("online", {"online_teacher": root / "big.pt", "ann": ann, "images": images})):
                out = root / name
                train_student(TrainStudentConfig(student=student, run=RunConfig(out=out, **run), optim=optim,
                                                 kd=KDConfig(alpha=1.0), **source))
                result[name] = last_epoch(out)
            ceiling = student_step_rate(student, a.device, a.batch_size, steps=3 if a.quick else 30)
            result["student_step_crops_per_s"] = ceiling
            result["cached_share_of_ceiling"] = result["cached"]["crops_per_s"] / ceiling
            result["online_over_cached_time"] = result["cached"]["crops_per_s"] / result["online"]["crops_per_s"]
            return result
        report.section("training", training)

        def speed() -> dict:
            archs = ("vitpose-nano",) if a.quick else ("vitpose-s", "vitpose-b", "vitpose-l", "vitpose-h")
            models = {arch: build_vitpose(vitpose_config(arch, input_hw=big_hw)) for arch in archs}
            models.update({name: build_student(StudentConfig(name, input_hw=big_hw), load_pretrained=False)
                           for name in ("mobilenetv3_large_100", "efficientformerv2_s0")})
            rows: dict[str, Any] = {}
            for bf16 in (False, True):
                for row in bench_models(models, big_hw, devices=[a.device], batch=a.batch_size, bf16=bf16):
                    rows.setdefault(row["name"], {"params_m": row["params_m"], "gflops": row["gflops"]})
                    rows[row["name"]]["bf16" if bf16 else "fp32"] = row["timings"][a.device]
            return {"input_hw": list(big_hw), "batch": a.batch_size, "models": rows}
        report.section("speed", speed)
    report.write()


if __name__ == "__main__":
    main()
