"""Benchmark of the teacher cache: bytes per view, fidelity, write ratio and read rate, printed as JSON.

    python scripts/bench_cache.py --teacher T.pt --ann A.json --images DIR [--json-out R.json]

1. Size and fidelity, per option: the fidelity teacher (`--teacher`, a *trained* one: random weights give
   unrepresentative heatmaps) runs in float32 on `--views` augmented views; each heatmap encoding and crop
   codec is applied through kdcache's own code path. Reported per option: stored bytes per view, relative
   L2 error of the decoded heatmaps (per view: ||decoded - fp32|| / ||fp32||), keypoint error (argmax +
   DARK decode of decoded vs fp32 maps, heatmap pixels) and decode time. A proxy for a sharper teacher
   (ground-truth UDP Gaussians + white noise) shows how the size depends on the teacher's background noise.
2. Write ratio: dump throughput (the whole `dump_teacher` call, startup included, default settings) over
   the forward-only throughput of the same teacher at the same batch size on pre-made input tensors, same
   device and threads; for `--speed-arch` (random weights: speed does not depend on them) and for the
   fidelity teacher.
3. Read rate: random-access `open_cache(...)[i]` (crop decode + heatmap decode + metadata) in one process
   on the fidelity teacher's cache written by (2), views per second; and its bytes per view on disk.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.augment import StudentAugConfig
from kdcache.cache import open_cache
from kdcache.cache_format import decode_crop, encode_crop
from kdcache.checkpoint import checkpoint_dict
from kdcache.coco import Instance, instances_from_coco, keypoint_set_of, load_coco
from kdcache.codec import UDPHeatmap
from kdcache.config import DumpConfig, RunConfig
from kdcache.data import TrainViews, ViewDataset
from kdcache.dump import dump_teacher
from kdcache.heatmap_decode import dark_udp
from kdcache.heatmap_storage import encode_rows, heatmap_storage, inflate_row
from kdcache.inference import to_input_tensor
from kdcache.inspect_cache import cache_summary
from kdcache.teacher import load_teacher
from kdcache.transforms import AugmentConfig, ViewSampler
from kdcache.vitpose import build_vitpose, vitpose_config

HEATMAP_OPTIONS = [("int16-step", 0.004), ("int16-step", 0.008), ("int16-step", 0.016), ("int16-step", 0.03),
                   ("float16", 0.0), ("uint8-minmax-per-joint", 0.0), ("int16-step-window", 0.008),
                   ("int16-step-window", 0.03)]
CROP_OPTIONS = ["jpeg75", "jpeg85", "jpeg90", "jpeg95", "png"]


def people(ann: Path, codec: UDPHeatmap) -> tuple[list[Instance], ViewSampler]:
    """The person instances of `ann`, and the views of them a dump makes (default augmentation, seed 0)."""
    coco = load_coco(ann)
    return instances_from_coco(coco, ann), ViewSampler(AugmentConfig(), codec, keypoint_set_of(coco, ann), 0)


def sample_views(teacher: torch.nn.Module, ann: Path, images: Path, n: int,
                 batch: int) -> tuple[np.ndarray, np.ndarray]:
    """n augmented views (4 per instance, view 0 plain): crops [n, H, W, 3] uint8, fp32 heatmaps [n, K, h, w]."""
    instances, sampler = people(ann, teacher.codec)
    items = [(i, v) for i in range(len(instances)) for v in range(4)][:n]
    dataset = ViewDataset(instances, images, sampler, items=items)
    crops = np.stack([dataset[i]["crop"] for i in range(len(items))])
    heat = []
    with torch.inference_mode():
        for s in range(0, len(crops), batch):
            heat.append(teacher(to_input_tensor(crops[s:s + batch])).float().numpy())
    return crops, np.concatenate(heat)


def heatmap_option(heat: np.ndarray, encoding: str, eps: float, level: int, sigma: float = 2.0) -> dict:
    """Encode every view as a shard would, decode as the reader does; bytes, fidelity and decode time.
    `sigma`: the codec's (the window storage's is 3 sigma)."""
    enc = heatmap_storage(encoding)
    chunks, side = encode_rows(heat, enc, eps, level, sigma)
    dtype = np.dtype(enc.dtype)
    start = time.perf_counter()
    decoded = []
    for i, chunk in enumerate(chunks):
        stored = inflate_row(chunk, dtype, heat.shape[1:], shuffle=dtype.itemsize > 1, deflate=True)
        decoded.append(enc.decode(stored, None if side is None else side[i]))
    decode_us = (time.perf_counter() - start) / len(chunks) * 1e6
    decoded = np.stack(decoded)
    n = len(heat)
    norm = np.linalg.norm(heat.reshape(n, -1), axis=1)
    live = norm > 0  # a view with no labelled joint has all-zero proxy maps
    rel = np.linalg.norm((decoded - heat).reshape(n, -1), axis=1)[live] / norm[live]
    ref, _ = dark_udp(heat)  # heatmap pixels
    got, _ = dark_udp(decoded)
    err = np.linalg.norm(got - ref, axis=-1)
    side_bytes = 0 if side is None else side[0].nbytes
    return {"heatmap_encoding": encoding, "rel_error": eps if encoding.startswith("int16-step") else None,
            "gzip_level": level, "bytes_per_view": float(np.mean([len(c) for c in chunks]) + side_bytes),
            "rel_l2_mean": float(rel.mean()), "rel_l2_max": float(rel.max()),
            "kp_err_median_px": float(np.median(err)), "kp_err_p99_px": float(np.percentile(err, 99)),
            "kp_err_share_over_0.05": float((err > 0.05).mean()), "decode_us": decode_us}


def crop_option(crops: np.ndarray, encoding: str) -> dict:
    blobs = [encode_crop(c, encoding) for c in crops]
    start = time.perf_counter()
    back = [decode_crop(b) for b in blobs]
    decode_us = (time.perf_counter() - start) / len(blobs) * 1e6
    mse = np.mean([(b.astype(np.float64) - c) ** 2 for b, c in zip(back, crops)])
    return {"crop_encoding": encoding, "bytes_per_view": float(np.mean([len(b) for b in blobs])),
            "psnr_db": float(10 * np.log10(255 ** 2 / mse)) if mse > 0 else None, "decode_us": decode_us}


def replay_option(ann: Path, images: Path, input_hw: tuple[int, int], n: int) -> dict:
    """Crop encoding "none": decode the whole image and warp (what the reader does), per view."""
    from kdcache.images import read_image
    from kdcache.transforms import warp_crop

    instances, sampler = people(ann, UDPHeatmap.for_input(input_hw))
    instances = instances[:n]
    start = time.perf_counter()
    for inst in instances:  # the worst case: every view from a different image
        geom = sampler.geometry(inst.bbox_xywh, inst.keypoints, inst.ann_id, 1)
        warp_crop(read_image(images / inst.file_name), geom.affine, input_hw)
    return {"crop_encoding": "none", "bytes_per_view": 0.0, "psnr_db": None,
            "decode_us": (time.perf_counter() - start) / len(instances) * 1e6}


def gaussian_proxy(ann: Path, images: Path, input_hw: tuple[int, int], n: int, noise: float) -> np.ndarray:
    """A sharp teacher's maps: ground-truth UDP Gaussians (peak 1) plus N(0, noise) on every pixel."""
    instances, sampler = people(ann, UDPHeatmap.for_input(input_hw, sigma=2.0))
    items = [(i, v) for i in range(len(instances)) for v in range(4)][:n]
    dataset = TrainViews(ViewDataset(instances, images, sampler, items=items), StudentAugConfig())
    rng = np.random.default_rng(0)
    heat = np.stack([dataset[i]["target"] for i in range(len(items))])
    return (heat + rng.normal(0, noise, heat.shape)).astype(np.float32)


def write_ratio(args: argparse.Namespace, ckpt: Path, out: Path) -> dict:
    """Forward-only throughput of the teacher in `ckpt`, then the whole dump at the same batch size.

    Alternated over `--rounds` (a fresh cache folder each round) so that drift on a shared machine hits
    both alike; the ratio reported is the median of the rounds'.
    """
    teacher = load_teacher(ckpt)
    input_hw = tuple(teacher.config.input_hw)
    instances, sampler = people(args.ann, teacher.codec)
    views = max(1, args.speed_views // len(instances))
    items = [(i, v) for i in range(len(instances)) for v in range(views)][:args.speed_views]
    dataset = ViewDataset(instances, args.images, sampler, items=items)
    batches = [to_input_tensor(np.stack([dataset[i]["crop"]
                                         for i in range(s, min(s + args.batch_size, len(items)))]))
               for s in range(0, len(items), args.batch_size)]
    sub_ann = out.with_suffix(".json")
    _subset_annotations(args.ann, sub_ann, {instances[i].ann_id for i, _ in items})
    rounds = []
    with torch.inference_mode():
        teacher(batches[0])  # warm-up
    for r in range(args.rounds):
        with torch.inference_mode():
            start = time.perf_counter()
            for x in batches:
                teacher(x)
            forward = len(items) / (time.perf_counter() - start)
        cfg = DumpConfig(teacher=ckpt, ann=sub_ann, images=args.images, views=views, batch_size=args.batch_size,
                         run=RunConfig(out=out / f"round{r}", workers=args.workers, progress=False))
        start = time.perf_counter()
        dump_teacher(cfg)
        dump = len(open_cache(cfg.run.out)) / (time.perf_counter() - start)
        rounds.append({"forward_views_per_s": forward, "dump_views_per_s": dump, "ratio": dump / forward})
    return {"arch": teacher.config.arch, "input_hw": list(input_hw), "batch_size": args.batch_size,
            "workers": args.workers, "threads": torch.get_num_threads(), "views": len(items), "rounds": rounds,
            "write_ratio": float(np.median([r["ratio"] for r in rounds])), "cache": str(out / f"round{r}")}


def _subset_annotations(ann: Path, out: Path, ann_ids: set[int]) -> None:
    data = json.loads(Path(ann).read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] in ann_ids]
    out.write_text(json.dumps(data))


def read_rate(cache_dir: Path, seconds: float = 5.0) -> dict:
    cache = open_cache(cache_dir)
    order = np.random.default_rng(0).permutation(len(cache))
    cache[int(order[0])]  # index the first shard outside the clock, as a long-running worker has
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        cache[int(order[done % len(order)])]
        done += 1
    summary = cache_summary(cache_dir)
    return {"views_per_s_one_process": done / (time.perf_counter() - start), "kb_per_view_on_disk":
            summary["kb_per_view"], "kb_per_view_parts": summary["kb_per_view_parts"],
            "crop_encoding": summary["crop_encoding"], "heatmap_encoding": summary["heatmap_encoding"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True, help="trained teacher for the fidelity measurements")
    p.add_argument("--ann", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--views", type=int, default=256, help="views for size and fidelity (default: 256)")
    p.add_argument("--gzip-level", type=int, default=DumpConfig.gzip_level)  # the dump's default
    p.add_argument("--speed-arch", default="vitpose-tiny", help="teacher for the write ratio (random weights)")
    p.add_argument("--speed-views", type=int, default=512, help="views dumped for the write ratio")
    p.add_argument("--input-hw", type=int, nargs=2, default=(256, 192), help="crop size of the speed teacher")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternations of forward-only and dump timing")
    p.add_argument("--skip", nargs="*", default=[], choices=("fidelity", "write", "read"))
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()

    report: dict = {"threads": torch.get_num_threads()}
    if "fidelity" not in args.skip:
        teacher = load_teacher(args.teacher)
        input_hw = tuple(teacher.config.input_hw)
        crops, heat = sample_views(teacher, args.ann, args.images, args.views, args.batch_size)
        peaks = heat.max(axis=(2, 3))
        report["fidelity_teacher"] = {"checkpoint": str(args.teacher), "arch": teacher.config.arch,
                                      "input_hw": list(input_hw), "views": len(heat),
                                      "peak_median": float(np.median(peaks)),
                                      "raw_bytes_per_view": {"heatmaps_fp32": heat[0].nbytes, "crop": crops[0].nbytes}}
        report["heatmaps"] = [heatmap_option(heat, enc, eps, args.gzip_level) for enc, eps in HEATMAP_OPTIONS]
        report["heatmaps_gzip_levels"] = [heatmap_option(heat, "int16-step", 0.008, lvl) for lvl in (1, 4, 6, 9)]
        report["crops"] = [crop_option(crops, enc) for enc in CROP_OPTIONS]
        report["crops"].append(replay_option(args.ann, args.images, input_hw, min(64, args.views)))
        report["sharp_teacher_proxy"] = []
        for noise in (0.0, 0.0005, 0.001, 0.003):
            proxy = gaussian_proxy(args.ann, args.images, input_hw, min(128, args.views), noise)
            row = heatmap_option(proxy, "int16-step", 0.008, args.gzip_level)
            report["sharp_teacher_proxy"].append({"background_noise_std": noise, **row})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "write" not in args.skip:
            torch.manual_seed(0)
            speed = build_vitpose(vitpose_config(args.speed_arch, input_hw=tuple(args.input_hw)))
            torch.save(checkpoint_dict(speed), work / "speed_teacher.pt")
            report["write"] = [write_ratio(args, work / "speed_teacher.pt", work / "speed_cache"),
                               write_ratio(args, args.teacher, work / "cache")]
        if "read" not in args.skip:
            cache = report["write"][1]["cache"] if "write" in report else None
            if cache is None:
                args.rounds = 1
                cache = write_ratio(args, args.teacher, work / "cache")["cache"]
            report["read"] = read_rate(Path(cache))
    print(json.dumps(report, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
