"""Shared fixtures: synthetic COCO data, nano teachers, hand-made cache shards, and the CLI's one error line.

Data and teachers are session-wide and memoised by their arguments: test files that ask for the same
dataset or teacher share one copy instead of each rendering and building its own.
"""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kdcache.cache_format import SCHEMA_VERSION, encode_crop
from kdcache.cache_writer import ShardRows, add_shard, write_manifest, write_shard
from kdcache.heatmap_storage import encode_rows, heatmap_storage

# kdcache's log format: "HH:MM:SS LEVEL logger: message".
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


@pytest.fixture
def error_line(capsys):
    """Reads stderr and returns the command's one error line, checked to be the only line there besides logs."""

    def read() -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if not LOG_LINE.match(line)]
        assert len(lines) == 1 and lines[0].startswith("kdcache") and "Traceback" not in err, err
        return lines[0]

    return read


# ---- synthetic data and teachers -------------------------------------------------------------------


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """synth_data(train_images, val_images, seed, max_people=4, clutter=1.0) -> dataset root (COCO layout)."""
    from kdcache.synth import SynthConfig, synthesize

    made: dict[tuple, Path] = {}

    def make(train_images: int, val_images: int, seed: int, max_people: int = 4, clutter: float = 1.0) -> Path:
        key = (train_images, val_images, seed, max_people, clutter)
        if key not in made:
            out = tmp_path_factory.mktemp("synth") / "data"
            made[key] = synthesize(SynthConfig(out=out, train_images=train_images, val_images=val_images, seed=seed,
                                               max_people=max_people, clutter=clutter))
        return made[key]

    return make


@pytest.fixture(scope="session")
def nano_teacher(tmp_path_factory):
    """nano_teacher(input_hw, head="classic", seed=0) -> kdcache checkpoint of a freshly initialised vitpose-nano."""
    from kdcache.checkpoint import checkpoint_dict
    from kdcache.vitpose import build_vitpose, vitpose_config

    made: dict[tuple, Path] = {}

    def make(input_hw: tuple[int, int], head: str = "classic", seed: int = 0) -> Path:
        key = (tuple(input_hw), head, seed)
        if key not in made:
            torch.manual_seed(seed)
            model = build_vitpose(vitpose_config("vitpose-nano", head=head, input_hw=input_hw))
            made[key] = tmp_path_factory.mktemp("teacher") / "teacher.pt"
            torch.save(checkpoint_dict(model, epoch=0, step=0), made[key])
        return made[key]

    return make


@pytest.fixture
def student_checkpoint(tmp_path):
    """student_checkpoint(backbone, input_hw) -> (model in eval mode, its kdcache checkpoint): a student (head 16
    channels, seed 0) whose BN statistics have left their initial values, as a trained one's have, so that a model
    run in train mode by mistake gives other outputs."""
    from kdcache.checkpoint import checkpoint_dict
    from kdcache.student import StudentConfig, build_student

    def make(backbone: str, input_hw: tuple[int, int]) -> tuple[torch.nn.Module, Path]:
        torch.manual_seed(0)
        model = build_student(StudentConfig(backbone, input_hw=input_hw, head_channels=16))
        with torch.no_grad():
            model.train()(torch.randn(2, 3, *input_hw))
        path = tmp_path / f"{backbone}.pt"
        torch.save(checkpoint_dict(model.eval(), epoch=1, step=1), path)
        return model, path

    return make


@pytest.fixture(scope="session")
def student_cache(tmp_path_factory, synth_data, nano_teacher):
    """student_cache(seed=0) -> {ann, images, teacher, cache}: six one-person images at 64x64 crops, a nano
    teacher and its cache of 3 views per instance dumped with `seed` (the students' tests share it; read only)."""
    from kdcache.config import DumpConfig, RunConfig
    from kdcache.dump import dump_teacher

    made: dict[int, dict] = {}

    def make(seed: int = 0) -> dict:
        if seed not in made:
            data = synth_data(6, 0, 4, max_people=1)
            ann, images = data / "annotations/person_keypoints_train.json", data / "train"
            teacher = nano_teacher((64, 64))
            out = tmp_path_factory.mktemp("student_cache") / "cache"
            cache = dump_teacher(DumpConfig(teacher=teacher, ann=ann, images=images, views=3,
                                            run=RunConfig(out=out, seed=seed, workers=0, progress=False)))
            made[seed] = {"ann": ann, "images": images, "teacher": teacher, "cache": cache}
        return made[seed]

    return make


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.fixture
def code_payload():
    """An object whose pickle runs code when loaded: files holding it must be refused (weights_only)."""
    return _RunsCode()


@pytest.fixture
def rewrite_json():
    """rewrite_json(src, dst, change) -> dst: the JSON file `src` with `change(data)` applied, written to `dst`."""

    def rewrite(src: Path, dst: Path, change) -> Path:
        data = json.loads(Path(src).read_text())
        change(data)
        Path(dst).write_text(json.dumps(data))
        return Path(dst)

    return rewrite


# ---- hand-made cache shards ------------------------------------------------------------------------

K, H, W = 17, 32, 24  # keypoints and heatmap size of the hand-made caches (crops are 4x: 128x96)


def teacher_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, K, H, W] float32: a Gaussian peak per joint on a noisy background, like a trained teacher's."""
    ys, xs = np.mgrid[0:H, 0:W]
    heat = rng.normal(0, 0.01, (n, K, H, W))
    cy, cx = rng.uniform(3, H - 3, (n, K)), rng.uniform(3, W - 3, (n, K))
    peak = rng.uniform(0.2, 0.9, (n, K))
    heat += peak[..., None, None] * np.exp(-((ys - cy[..., None, None]) ** 2 + (xs - cx[..., None, None]) ** 2) / 8)
    heat[:, 3] = 0.0  # an all-zero map must survive every storage
    return heat.astype(np.float32)


def shard_rows(n: int, seed: int = 0, storage: str = "int16-step", crop: str = "jpeg95"
               ) -> tuple[ShardRows, list[np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """n random rows as the dump hands them to `write_shard`; also the crops, heatmaps and columns written."""
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):  # smooth crops, so JPEG error stays small and measurable
        small = rng.integers(0, 255, (8, 6, 3), dtype=np.uint8)
        crops.append(cv2.resize(small, (W * 4, H * 4), interpolation=cv2.INTER_LINEAR))
    heat = teacher_like(n, rng)
    kind = heatmap_storage(storage)
    chunks, side = encode_rows(heat, kind, 0.008, 2)
    columns = {
        "confidence": heat.max(axis=(2, 3)), "affine": rng.normal(size=(n, 2, 3)), "flip": rng.random(n) < 0.5,
        "image_id": rng.integers(0, 1000, n), "ann_id": np.arange(n) + 100, "view": np.arange(n) % 3,
        "keypoints": rng.normal(size=(n, K, 3)).astype(np.float32),
        "labelled": rng.random(n) < 0.7, "box_score": rng.uniform(0.1, 1.0, n).astype(np.float32),
    }
    rows = ShardRows((K, H, W), kind, replay=False)
    rows.add(chunks, side, columns, [encode_crop(c, crop) for c in crops], [])
    return rows, crops, heat, columns


def write_test_cache(path: Path, n_per_shard=(5, 3), storage: str = "int16-step", crop: str = "jpeg95") -> list:
    """A complete cache of len(n_per_shard) shards at `path`; returns (rows, crops, heatmaps, columns) per shard."""
    path.mkdir(exist_ok=True)
    manifest = {"schema_version": SCHEMA_VERSION, "complete": False, "shards": [], "num_shards": len(n_per_shard),
                "input_hw": [H * 4, W * 4], "heatmap_hw": [H, W], "sigma": 2.0,
                "heatmap_encoding": storage, "crop_encoding": crop}
    write_manifest(path, manifest)
    written = []
    for index, n in enumerate(n_per_shard):
        rows, crops, heat, columns = shard_rows(n, seed=index, storage=storage, crop=crop)
        entry = write_shard(path, index, rows, {"schema_version": SCHEMA_VERSION, "d": {"a": 1}}, 2)
        add_shard(path, entry)
        written.append((rows, crops, heat, columns))
    return written


@pytest.fixture
def make_cache():
    """make_cache(path, n_per_shard=(5, 3), storage="int16-step", crop="jpeg95"): see `write_test_cache`."""
    return write_test_cache


@pytest.fixture
def make_rows():
    """make_rows(n, seed=0, storage="int16-step", crop="jpeg95"): see `shard_rows`."""
    return shard_rows


@pytest.fixture
def make_heatmaps():
    """make_heatmaps(n, rng) -> [n, 17, 32, 24] teacher-like maps (joint 3 all zero)."""
    return teacher_like


def rel_l2(a, b, axis=None):
    return np.linalg.norm(a - b, axis=axis) / np.linalg.norm(b, axis=axis)
