"""Cost of pose models side by side: parameters, GFLOPs, latency and throughput, in one run.

All numbers are for one forward of the network alone (no decoding, no data loading), in eval mode under
`torch.inference_mode`, on random input of the model's crop size; CPU and GPU side by side in one table.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdcache.errors import UserError

log = logging.getLogger(__name__)

BENCH_BATCH = 32  # crops per forward for the throughput figure


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, input_hw: tuple[int, int], batch: int = 1) -> float:
    """GFLOPs of one forward per crop, as `torch.utils.flop_counter.FlopCounterMode` counts them.

    The counter counts 2 FLOPs per multiply-add of matmuls, convolutions (transposed too) and attention, and
    nothing for normalisation, activations or resampling: this is 2 × GMACs. Papers quoting fvcore/mmcv
    "GFLOPs" (ViTPose, MobileNet) quote multiply-adds, so halve this number to compare with them.
    """
    device = _device_of(model)
    x = torch.zeros(batch, 3, *input_hw, device=device)
    with _eval(model), torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / batch / 1e9


def resolve_devices(spec: str | None) -> list[str]:
    """The devices to time, in column order: "cpu,cuda" -> ["cpu", "cuda"]; None -> cpu, plus cuda if present.

    Raises:
        UserError: a name that is not cpu/cuda/cuda:N, or a CUDA device PyTorch does not see.
    """
    if spec is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = list(dict.fromkeys(d.strip() for d in spec.split(",") if d.strip()))
    if not devices:
        raise UserError("--device is empty; pass cpu, cuda or both as cpu,cuda")
    for name in devices:
        try:
            device = torch.device(name)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise UserError(f"--device {name}: not a device kdcache knows; use cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: PyTorch sees no CUDA device here; use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return devices


def measure_latency(
    model: nn.Module, input_hw: tuple[int, int], device: str = "cpu", batch: int = 1, warmup: int = 3,
    iters: int = 10, bf16: bool = False,
) -> float:
    """Median wall time of one forward of a `[batch, 3, H, W]` input, in milliseconds.

    The model is moved to `device` (and stays there). On CUDA each call is synchronised before the clock
    starts and before it stops. `bf16` runs the forward under `torch.autocast(dtype=torch.bfloat16)`.
    """
    model.to(device)
    device_type = torch.device(device).type
    x = torch.randn(batch, 3, *input_hw, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device_type == "cuda" else (lambda: None)
    times = []
    with _eval(model), torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=bf16):
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def bench_models(
    models: dict[str, nn.Module], input_hw: tuple[int, int], devices: Sequence[str] = ("cpu",),
    batch: int = BENCH_BATCH,
    iters: int = 10, bf16: bool = False,
) -> list[dict[str, Any]]:
    """Benchmark every model under the same conditions on each device.

    Each model visits the devices in turn and is moved back to where it was afterwards. `bf16` applies to
    CUDA devices only: CPU numbers stay fp32 (bf16 autocast is slower than fp32 on most CPUs).

    Returns:
        One row per model: name, params_m (millions), gflops (per crop, device-independent), batch, and
        timings: {device: {latency_ms_b1 (median ms at batch 1), crops_per_s (throughput at `batch`),
        precision ("fp32" or "bf16"), hardware (CPU threads or GPU name)}}.
    """
    rows = []
    for name, model in models.items():
        home = _device_of(model)
        row: dict[str, Any] = {"name": name, "params_m": count_params(model) / 1e6,
                               "gflops": count_gflops(model, input_hw), "batch": batch, "timings": {}}
        try:
            for device in devices:
                half = bf16 and torch.device(device).type == "cuda"
                log.info("bench %s on %s%s", name, device, " (bf16)" if half else "")
                latency_b1 = measure_latency(model, input_hw, device=device, batch=1, iters=iters, bf16=half)
                latency_batch = measure_latency(model, input_hw, device=device, batch=batch, warmup=2,
                                                iters=max(3, iters // 3), bf16=half)
                row["timings"][device] = {"latency_ms_b1": latency_b1, "crops_per_s": batch / (latency_batch / 1e3),
                                          "precision": "bf16" if half else "fp32", "hardware": _hardware(device)}
        finally:
            model.to(home)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `bench_models` rows, devices side by side, then one line per device's hardware."""
    batch = rows[0]["batch"] if rows else ""
    columns = list(dict.fromkeys((d, t["precision"]) for r in rows for d, t in r["timings"].items()))
    head = "| model | params (M) | GFLOPs |"
    for device, precision in columns:
        label = device if precision == "fp32" else f"{device} {precision}"
        head += f" {label} b1 (ms) | {label} crops/s @ b{batch} |"
    lines = [head, "|---|---:|---:|" + "---:|---:|" * len(columns)]
    for r in rows:
        line = f"| {r['name']} | {r['params_m']:.2f} | {r['gflops']:.2f} |"
        for device, _ in columns:
            t = r["timings"].get(device)
            line += f" {t['latency_ms_b1']:.1f} | {t['crops_per_s']:.0f} |" if t else " - | - |"
        lines.append(line)
    hardware = dict.fromkeys(f"{d}: {t['hardware']}" for r in rows for d, t in r["timings"].items())
    return "\n".join(lines + ([""] + list(hardware) if hardware else []))


def _hardware(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{torch.get_num_threads()} threads"


class _eval:
    """Eval mode for the block, then the model's previous mode back (benchmarks must not flip training)."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
