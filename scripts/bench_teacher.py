"""Teacher throughput: kdcache's ViTPose against a timm ViT of the same dimensions (the floor to beat).

For each size (S/B/L/H) it times, in rounds that rotate through the models so that drift hits all alike:

- `ours backbone`: `ViTPose.backbone` (patch embed with the official padding, pos_embed, blocks, last norm);
- `timm backbone`: `timm` VisionTransformer `forward_features` with the same width, depth, heads, MLP ratio,
  qkv bias and 16x12 token grid (no class token), i.e. the same matmuls: the apples-to-apples floor;
- `ours full`: backbone + the classic deconv head (what the dump runs per crop);
- optionally `ours flip`: `kdcache.inference.predict_heatmaps(..., flip_test=True)` on uint8 crops.

Random weights (speed does not depend on them), eval mode, `torch.inference_mode`, bf16 autocast on CUDA
when `--amp` (the dump's setting). Throughput is batch / the best round's time (on a shared machine other
processes only ever add time). Prints one JSON object per size and a markdown table.

    python scripts/bench_teacher.py                         # CPU: S, B at batch 8; L batch 4; H batch 2
    python scripts/bench_teacher.py --device cuda --amp --batch 64 --iters 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext

import timm
import torch

from kdcache.vitpose import ViTPose, vitpose_config

TIMM_NAMES = {"vitpose-s": "vit_small_patch16_224", "vitpose-b": "vit_base_patch16_224",
              "vitpose-l": "vit_large_patch16_224", "vitpose-h": "vit_huge_patch14_224"}
CPU_PLAN = {"vitpose-s": (8, 6), "vitpose-b": (8, 4), "vitpose-l": (4, 3), "vitpose-h": (2, 3)}  # (batch, iters)


def timm_twin(arch: str, input_hw: tuple[int, int]) -> torch.nn.Module:
    cfg = vitpose_config(arch)
    return timm.create_model(
        TIMM_NAMES[arch], pretrained=False, img_size=input_hw, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0,
        global_pool="", class_token=False)


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench_arch(arch: str, device: torch.device, batch: int, iters: int, warmup: int, amp: bool,
               flip: bool) -> dict:
    input_hw = (256, 192)
    ours = ViTPose(vitpose_config(arch)).to(device).eval()
    twin = timm_twin(arch, input_hw).to(device).eval()
    x = torch.randn(batch, 3, *input_hw, device=device)
    crops = torch.randint(0, 256, (batch, *input_hw, 3), dtype=torch.uint8)
    assert ours.backbone(x[:1]).shape[-2:] == (16, 12) and twin.forward_features(x[:1]).shape[1] == 16 * 12
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    runs = {"ours_backbone": lambda: ours.backbone(x), "timm_backbone": lambda: twin.forward_features(x),
            "ours_full": lambda: ours(x)}
    if flip:
        from kdcache.inference import predict_heatmaps
        from kdcache.keypoints import COCO_17

        runs["ours_flip"] = lambda: predict_heatmaps(ours, crops, ours.codec, COCO_17, flip_test=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode(), autocast:
        order = list(runs)
        for i in range(warmup + iters):
            for name in order[i % len(order):] + order[:i % len(order)]:  # rotate: no model always goes first
                t = timed(runs[name], sync)
                if i >= warmup:
                    times[name].append(t)
    row = {"arch": arch, "device": str(device), "batch": batch, "iters": iters, "amp": amp,
           "params_m": sum(p.numel() for p in ours.parameters()) / 1e6}
    for name, ts in times.items():
        row[f"{name}_crops_per_s"] = batch / min(ts)  # best round: other processes only ever add time
    row["backbone_vs_timm"] = row["ours_backbone_crops_per_s"] / row["timm_backbone_crops_per_s"]
    row["full_vs_timm"] = row["ours_full_crops_per_s"] / row["timm_backbone_crops_per_s"]
    return row


def table(rows: list[dict]) -> str:
    flip = any("ours_flip_crops_per_s" in r for r in rows)
    head = ("| model | device | batch | timm ViT backbone | ours backbone | ratio "
            "| ours full (backbone + head) | ratio |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    lines = [head + (" ours flip-test |" if flip else ""), rule + ("---:|" if flip else "")]
    for r in rows:
        line = (f"| {r['arch']} | {r['device']}{' bf16' if r['amp'] else ''} | {r['batch']} "
                f"| {r['timm_backbone_crops_per_s']:.3g} | {r['ours_backbone_crops_per_s']:.3g} "
                f"| {r['backbone_vs_timm']:.2f} | {r['ours_full_crops_per_s']:.3g} | {r['full_vs_timm']:.2f} |")
        lines.append(line + (f" {r.get('ours_flip_crops_per_s', float('nan')):.3g} |" if flip else ""))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(TIMM_NAMES), choices=list(TIMM_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, help="crops per forward (default: per-size CPU plan)")
    p.add_argument("--iters", type=int, help="timed rounds (default: per-size CPU plan)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--flip", action="store_true", help="also time flip-test inference (predict_heatmaps)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    print(json.dumps({"torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine(),
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                      "load_avg_1min": os.getloadavg()[0]}))
    rows = []
    for arch in a.archs:
        batch, iters = CPU_PLAN[arch]
        row = bench_arch(arch, device, a.batch or batch, a.iters or iters, a.warmup, a.amp, a.flip)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"load_avg_1min": os.getloadavg()[0]}))  # other processes skew CPU numbers
    print(table(rows))


if __name__ == "__main__":
    main()
