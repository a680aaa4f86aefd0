"""SHA-256 of every dataset of a fixed dump, for checking that a refactor leaves the cache's bytes alone.

    python scripts/dump_digest.py --out /tmp/digest_before      # at the old commit
    python scripts/dump_digest.py --out /tmp/digest_after       # at the new one
    diff /tmp/digest_before/digest.json /tmp/digest_after/digest.json

The dump is fixed: synthetic data (seed 3), a nano ViTPose teacher initialised from seed 0, 3 views per
instance, one intra-op thread; one run with JPEG crops and int16-step heatmaps, one with crop format "none"
and float16 heatmaps. Per shard it prints each dataset's dtype, shape and the SHA-256 of its raw bytes
(heatmaps: the stored values after inflate), and the attributes that are not expected to change
(all but the schema version, kdcache version and git revision, the dump record, which holds this run's
absolute paths, and the fields schema 3 adds: codec, keypoint_set, the teacher record's kind).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Attributes that a refactor may change without changing what the cache holds.
VOLATILE_ATTRS = ("schema_version", "kdcache_version", "git_rev", "codec", "keypoint_set", "dump")


def _build_inputs(root: Path) -> tuple[Path, Path, Path]:
    from kdcache.synth import SynthConfig, synthesize

    data = synthesize(SynthConfig(out=root / "data", train_images=6, val_images=0, seed=3, max_people=2))
    try:  # the module moved in the redesign (issue 12)
        from kdcache.vitpose import build_vitpose, vitpose_config
    except ImportError:
        from kdcache.teacher import build_vitpose, vitpose_config
    from kdcache.checkpoint import checkpoint_dict

    torch.manual_seed(0)
    teacher = build_vitpose(vitpose_config("vitpose-nano", input_hw=(128, 96)))
    # A trained teacher's maps are peaked; random head weights give near-zero maps that quantise to nothing.
    with torch.no_grad():
        for p in teacher.keypoint_head.parameters():
            p.mul_(50.0)
    checkpoint = checkpoint_dict(teacher, epoch=0, step=0)
    checkpoint.update(git_rev="digest", kdcache_version="digest")  # the same teacher bytes at every commit
    torch.save(checkpoint, root / "teacher.pt")
    return root / "teacher.pt", data / "annotations/person_keypoints_train.json", data / "train"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _shard_digest(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        for name, ds in sorted(f.items()):
            data = ds[()]
            if data.dtype.kind == "O":
                data = np.array([bytes(v) if not isinstance(v, bytes) else v for v in data.tolist()], dtype=object)
                out[name] = {"dtype": "object", "shape": list(data.shape),
                             "sha256": hashlib.sha256(b"\0".join(data.tolist())).hexdigest()}
            else:
                out[name] = {"dtype": str(data.dtype), "shape": list(data.shape), "sha256": _digest(data)}
        out["attrs"] = {k: (v if not isinstance(v, np.generic) else v.item()) for k, v in sorted(f.attrs.items())
                        if k not in VOLATILE_ATTRS}
        if "teacher" in out["attrs"]:  # schema 3 adds the teacher's family ("kind") to its record
            teacher = json.loads(out["attrs"]["teacher"])
            teacher.pop("kind", None)
            out["attrs"]["teacher"] = json.dumps(teacher)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder; digest.json is written there")
    args = parser.parse_args()
    from kdcache.cli import main as kdcache

    args.out.mkdir(parents=True, exist_ok=True)
    teacher, ann, images = _build_inputs(args.out)
    runs = {"jpeg-int16": [], "none-float16": ["--crop", "none", "--heatmap-encoding", "float16"]}
    digest = {}
    for name, extra in runs.items():
        cache = args.out / name
        code = kdcache(["dump-teacher", "--teacher", str(teacher), "--ann", str(ann), "--images", str(images),
                        "--out", str(cache), "--views", "3", "--shard-size", "8", "--batch-size", "4",
                        "--workers", "0", "--no-progress", "--seed", "0", *extra])
        if code:
            sys.exit(f"dump {name} failed with exit code {code}")
        digest[name] = {p.name: _shard_digest(p) for p in sorted(cache.glob("shard-*.h5"))}
    (args.out / "digest.json").write_text(json.dumps(digest, indent=1, sort_keys=True))
    print(f"wrote {args.out / 'digest.json'}")


if __name__ == "__main__":
    main()
