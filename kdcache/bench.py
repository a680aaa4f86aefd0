"""Cost of pose models side by side: parameters, GFLOPs, latency and throughput, in one run.

All numbers are for one forward of the network alone (no decoding, no data loading), in eval mode under
`torch.inference_mode`, on random input of the model's crop size.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)


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


def measure_latency(
    model: nn.Module, input_hw: tuple[int, int], device: str = "cpu", batch: int = 1, warmup: int = 3, iters: int = 10
) -> float:
    """Median wall time of one forward of a `[batch, 3, H, W]` input, in milliseconds.

    The model is moved to `device` (and stays there). On CUDA each call is synchronised before the clock stops.
    """
    model.to(device)
    x = torch.randn(batch, 3, *input_hw, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    with _eval(model), torch.inference_mode():
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def bench_models(
    models: dict[str, nn.Module], input_hw: tuple[int, int], device: str = "cpu", batch: int = 32, iters: int = 10
) -> list[dict]:
    """Benchmark every model under the same conditions.

    Returns:
        One row per model: name, params_m (millions), gflops (per crop), latency_ms_b1 (median ms at batch 1),
        crops_per_s (throughput at `batch`), batch, device.
    """
    rows = []
    for name, model in models.items():
        log.info("bench %s on %s", name, device)
        gflops = count_gflops(model, input_hw)
        latency_b1 = measure_latency(model, input_hw, device=device, batch=1, iters=iters)
        latency_batch = measure_latency(model, input_hw, device=device, batch=batch, warmup=2, iters=max(3, iters // 3))
        rows.append(
            dict(
                name=name,
                params_m=count_params(model) / 1e6,
                gflops=gflops,
                latency_ms_b1=latency_b1,
                crops_per_s=batch / (latency_batch / 1000.0),
                batch=batch,
                device=device,
            )
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of `bench_models` rows."""
    batch = rows[0]["batch"] if rows else ""
    lines = [
        f"| model | params (M) | GFLOPs | latency b1 (ms) | crops/s @ b{batch} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params_m']:.2f} | {r['gflops']:.2f} | {r['latency_ms_b1']:.1f} "
                     f"| {r['crops_per_s']:.0f} |")
    return "\n".join(lines)


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
