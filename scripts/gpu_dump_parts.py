"""Where a GPU dump's time goes (follow-up to gpu_check's dump section): the same ViTPose-B dump of synthetic
people, varying one part at a time (crops not stored; float16 maps without deflate; int16-step with deflate 1;
fewer loader workers; crops normalised on the CPU before they travel, as the dump did before). JSON in --json-out.

    python scripts/gpu_dump_parts.py --json-out parts.json
"""
import argparse, json, os, sys, tempfile, time  # noqa: E401
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdcache.cache import open_cache  # noqa: E402
from kdcache.checkpoint import checkpoint_dict  # noqa: E402
from kdcache.config import DumpConfig, RunConfig  # noqa: E402
from kdcache import dump as dump_module  # noqa: E402
from kdcache.dump import dump_teacher  # noqa: E402
from kdcache.inference import input_heatmaps, predict_heatmaps, to_input_tensor  # noqa: E402


def normalised_on_cpu(model, crops, codec, keypoint_set, flip_test=False):
    """The dump's teacher call as it was: float32 input made on the CPU, then moved to the GPU."""
    device = next(model.parameters()).device
    return input_heatmaps(model, to_input_tensor(crops).to(device), codec, keypoint_set, flip_test)
from kdcache.synth import SynthConfig, synthesize  # noqa: E402
from kdcache.vitpose import build_vitpose, vitpose_config  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--people", type=int, default=2048)
    p.add_argument("--arch", default="vitpose-b")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()
    cores = os.cpu_count() or 2
    variants = {"default": {}, "crops not stored": {"crop_format": "none"},
                "float16 maps, no deflate": {"heatmap_storage": "float16", "gzip_level": 0},
                "deflate level 1": {"gzip_level": 1}, f"{cores // 2} workers": {"workers": cores // 2},
                "normalised on the CPU": {"cpu_normalise": True}, "default, again": {}}
    result = {"people": a.people, "views": 4, "cores": cores}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthesize(SynthConfig(out=root / "data", train_images=a.people, val_images=0, seed=0, max_people=1,
                                      workers=cores))
        torch.manual_seed(0)
        torch.save(checkpoint_dict(build_vitpose(vitpose_config(a.arch, input_hw=(256, 192)))), root / "t.pt")
        for i, (name, over) in enumerate(variants.items()):
            workers = over.pop("workers", cores)
            dump_module.predict_heatmaps = (normalised_on_cpu if over.pop("cpu_normalise", False)
                                            else predict_heatmaps)
            start = time.perf_counter()
            try:
                cache = dump_teacher(DumpConfig(teacher=root / "t.pt", ann=data / "annotations/person_keypoints_train.json",
                                                images=data / "train", views=4, batch_size=64,
                                                run=RunConfig(out=root / f"c{i}", device=a.device, workers=workers,
                                                              progress=False), **over))
                seconds = time.perf_counter() - start
                result[name] = {"views_per_s": len(open_cache(cache)) / seconds, "seconds": seconds}
            except Exception as e:  # noqa: BLE001 - a device run records and goes on
                result[name] = {"error": f"{type(e).__name__}: {e}"}
            print(name, result[name], flush=True)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json_out:
        a.json_out.write_text(text)


if __name__ == "__main__":
    main()
