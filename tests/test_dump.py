"""dump-teacher end to end: kill -9 and rerun, damaged shards and a full disk repaired by a rerun, bad
images, torchrun ranks, teacher flip, crop replay (and changed images refused), inputs checked up front,
and train-student refusing damaged or mismatched caches. Real processes, real kills, real broken files."""

import errno
import hashlib
import logging
import os
import tempfile
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from kdcache import cache_format as fmt
from kdcache.cache import open_cache, verify_cache
from kdcache.cli import main
from kdcache.coco import load_instances
from kdcache.config import DumpConfig, RunConfig
from kdcache.dump import dump_teacher
from kdcache.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread: the same float results in every process (pytest's, the CLI's, each torchrun rank).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
DUMP = ["--views", "3", "--shard-size", "4", "--batch-size", "2", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_data, nano_teacher):
    """Shared data and teacher (tests copy the images before changing them)."""
    root = tmp_path_factory.mktemp("dump")
    data = synth_data(6, 0, 3, max_people=2)
    ann = data / "annotations/person_keypoints_train.json"
    return {"root": root, "ann": ann, "images": data / "train", "teacher": nano_teacher((128, 96)),
            "instances": load_instances(ann)}


def _args(setup, out, images=None, *extra):
    return ["dump-teacher", "--teacher", str(setup["teacher"]), "--ann", str(setup["ann"]),
            "--images", str(images or setup["images"]), "--out", str(out), *DUMP, *extra]


def _cli(args):
    return [sys.executable, "-m", "kdcache", *args]


def _shards(path):
    """What must be identical between two runs: the manifest minus nothing, and every shard's bytes."""
    manifest = fmt.read_manifest(path)
    return manifest, {s["name"]: (path / s["name"]).read_bytes() for s in manifest["shards"]}


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted single-process dump, as a subprocess."""
    out = setup["root"] / "reference"
    subprocess.run(_cli(_args(setup, out)), env=ENV, check=True, timeout=300)
    return out


def _cfg(setup, out, images=None, **extra) -> DumpConfig:
    """The DumpConfig of `_args` (for calls in this process: keyword options and monkeypatches apply)."""
    return DumpConfig(teacher=setup["teacher"], ann=setup["ann"], images=images or setup["images"],
                      run=RunConfig(out=out, workers=0, progress=False), views=3, shard_size=4, batch_size=2,
                      **extra)


@pytest.fixture(scope="module")
def inproc(setup):
    """An uninterrupted dump in this process: the reference for reruns made here (same float threads)."""
    out = setup["root"] / "inproc"
    dump_teacher(_cfg(setup, out))
    return out


def _kill_after_new_shard(args, out, have: int) -> int:
    """Start the dump, kill -9 it as soon as the manifest lists more than `have` shards; returns the count."""
    proc = subprocess.Popen(_cli(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        manifest = fmt.read_manifest(out) if (out / "manifest.json").exists() else None
        if manifest and len(manifest["shards"]) > have:
            break
        time.sleep(0.002)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    manifest = fmt.read_manifest(out)
    assert not manifest["complete"], "the dump finished before it could be killed; give it more work"
    return len(manifest["shards"])


def test_kill_9_then_rerun_equals_uninterrupted(setup, reference, tmp_path):
    out = tmp_path / "cache"
    have = _kill_after_new_shard(_args(setup, out), out, 0)
    _kill_after_new_shard(_args(setup, out), out, have)  # killed again while resuming
    subprocess.run(_cli(_args(setup, out)), env=ENV, check=True, timeout=300)
    manifest, shards = _shards(out)
    ref_manifest, ref_shards = _shards(reference)
    assert manifest == ref_manifest and manifest["complete"]
    assert shards == ref_shards  # bit for bit: no duplicate, no missing view, same values
    assert not list(out.glob("*.tmp")) and verify_cache(out) == []


def test_torchrun_ranks_write_the_single_process_cache(setup, reference, tmp_path):
    out = tmp_path / "cache"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdcache"]
    result = subprocess.run(launch + _args(setup, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest, shards = _shards(out)
    assert manifest == fmt.read_manifest(reference) and manifest["complete"]
    assert shards == _shards(reference)[1]


def test_loader_workers_write_the_in_process_cache(setup, reference, tmp_path):
    """Crops made in DataLoader workers (handed over as tensors in shared memory) give the cache that loading in the
    dumping process gives, bit for bit."""
    out = tmp_path / "cache"
    subprocess.run(_cli(_args(setup, out, None, "--workers", "2")), env=ENV, check=True, timeout=300)
    manifest, shards = _shards(out)
    assert manifest == fmt.read_manifest(reference) and manifest["complete"]
    assert shards == _shards(reference)[1]


def test_missing_image_stops_with_one_line_and_rerun_resumes(setup, tmp_path, capsys, error_line):
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    assert main(_args(setup, tmp_path / "ref", images)) == 0
    victim = images / setup["instances"][-1].file_name  # the last image: earlier shards complete first
    saved = victim.read_bytes()
    victim.unlink()
    capsys.readouterr()
    out = tmp_path / "cache"
    assert main(_args(setup, out, images)) == 2
    err = error_line()
    assert victim.name in err and "--skip-bad-images" in err
    manifest = fmt.read_manifest(out)
    assert 0 < len(manifest["shards"]) < manifest["num_shards"] and verify_cache(out)[0].startswith("incomplete")
    victim.write_bytes(saved)
    assert main(_args(setup, out, images)) == 0
    assert _shards(out) == _shards(tmp_path / "ref")


def test_skip_bad_images_lists_them_and_keeps_the_rest(setup, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    garbage, truncated = setup["instances"][0].file_name, setup["instances"][-1].file_name
    (images / garbage).write_bytes(b"\xff\xd8 this is not a JPEG any more")
    (images / truncated).write_bytes((images / truncated).read_bytes()[:3000])
    out = tmp_path / "cache"
    assert main(_args(setup, out, images, "--skip-bad-images")) == 0
    assert "skipped 2 unreadable images" in capsys.readouterr().out
    manifest = fmt.read_manifest(out)
    assert manifest["complete"] and manifest["skipped_images"] == sorted([garbage, truncated])
    cache = open_cache(out)
    good = [inst for inst in setup["instances"] if inst.file_name not in (garbage, truncated)]
    keys = sorted((cache[i]["ann_id"], cache[i]["view"]) for i in range(len(cache)))
    assert keys == sorted((inst.ann_id, v) for inst in good for v in range(3))
    assert main(["inspect", str(out)]) == 0
    assert garbage in capsys.readouterr().out


def test_teacher_flip_and_confidence(setup, tmp_path):
    from kdcache.inference import to_input_tensor
    from kdcache.keypoints import COCO_17
    from kdcache.teacher import load_teacher

    out = tmp_path / "cache"
    assert main(_args(setup, out, None, "--teacher-flip", "--crop", "png", "--heatmap-error", "0.008")) == 0
    cache = open_cache(out)
    assert cache.manifest["teacher_flip"]
    teacher = load_teacher(setup["teacher"])
    rows = [cache[i] for i in range(4)]
    x = to_input_tensor(np.stack([r["crop"] for r in rows]))  # PNG: exactly the crops the teacher saw
    with torch.no_grad():
        plain = teacher(x)
        expected = ((plain + teacher.codec.flip(teacher(torch.flip(x, dims=[3])), COCO_17)) / 2).numpy()
    for row, want, unflipped in zip(rows, expected, plain.numpy()):
        assert np.linalg.norm(row["heatmaps"] - want) / np.linalg.norm(want) < 0.01
        assert np.linalg.norm(row["heatmaps"] - unflipped) > 5 * np.linalg.norm(row["heatmaps"] - want)
        np.testing.assert_allclose(row["confidence"], want.max(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_a_kdcache_student_teaches_a_cache_another_student_trains_on(setup, student_checkpoint, tmp_path):
    """A model train-student made (here a MobileNet) dumps as any teacher: its own heatmaps, its codec, its name."""
    from kdcache.inference import to_input_tensor
    from kdcache.models import load_model

    big, path = student_checkpoint("mobilenetv3_small_100", (128, 96))  # it must teach in eval mode
    out = tmp_path / "cache"
    assert main(_args({**setup, "teacher": path}, out, None, "--crop", "png",
                      "--heatmap-error", "0.008")) == 0
    cache = open_cache(out)
    assert cache.manifest["teacher"]["kind"] == "student"
    assert cache.manifest["teacher"]["arch"] == "mobilenetv3_small_100"
    assert cache.codec == big.codec
    rows = [cache[i] for i in range(4)]
    with torch.no_grad():
        want = big(to_input_tensor(np.stack([r["crop"] for r in rows]))).numpy()  # PNG: the very crops it saw
    for row, expected in zip(rows, want):
        assert np.linalg.norm(row["heatmaps"] - expected) / np.linalg.norm(expected) < 0.01
    run = tmp_path / "small"
    assert main(["train-student", "--cache", str(out), "--student", "mobilenetv3_small_050", "--head-channels", "8",
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress", "--out", str(run)]) == 0
    trained = load_model(run / "last.pt")
    assert trained.config.arch == "mobilenetv3_small_050" and trained.codec == big.codec  # the cache's crops and codec


def test_crop_none_replays_the_same_crops(setup, tmp_path):
    from kdcache.data import CachedDataset

    assert main(_args(setup, tmp_path / "png", None, "--crop", "png")) == 0
    assert main(_args(setup, tmp_path / "none", None, "--crop", "none")) == 0
    png, none = open_cache(tmp_path / "png"), open_cache(tmp_path / "none")
    assert len(png) == len(none)
    for i in (0, len(png) // 2, len(png) - 1):
        np.testing.assert_array_equal(none[i]["crop"], png[i]["crop"])
        np.testing.assert_array_equal(none[i]["heatmaps"], png[i]["heatmaps"])
    with h5py.File(tmp_path / "none/shard-00000.h5", "r") as f:
        assert "crop" not in f and f["image_file"][0].decode() == setup["instances"][0].file_name
    dataset = CachedDataset(none, flip_prob=0.0, seed=0)
    assert dataset.row_of(0) == 1  # epoch 0: view 1 of instance 0
    np.testing.assert_array_equal(dataset[0]["crop"], png[1]["crop"])


def test_crop_none_cache_trains_from_moved_images(setup, tmp_path, capsys, error_line):
    shutil.copytree(setup["images"], tmp_path / "orig")
    assert main(_args(setup, tmp_path / "none", tmp_path / "orig", "--crop", "none")) == 0
    (tmp_path / "orig").rename(tmp_path / "moved")
    student = ["train-student", "--cache", str(tmp_path / "none"), "--student", "mobilenetv3_small_100",
               "--max-steps", "1", "--batch-size", "2", "--workers", "0", "--no-progress"]
    assert main([*student, "--out", str(tmp_path / "lost")]) == 2
    err = error_line()
    assert "orig" in err
    assert main([*student, "--images", str(tmp_path / "moved"), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run/last.pt").is_file()


def test_train_student_refuses_damaged_or_mismatched_caches(setup, reference, tmp_path, capsys, error_line):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    student = ["train-student", "--cache", str(cache), "--student", "mobilenetv3_small_100", "--out",
               str(tmp_path / "run"), "--max-steps", "1", "--workers", "0", "--no-progress"]
    assert main([*student, "--input-size", "64x64"]) == 2
    err = error_line()
    assert "input_hw [128, 96] (student: [64, 64])" in err
    shard = cache / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    assert main(student) == 2
    err = error_line()
    assert "shard-00001.h5" in err and "damaged" in err
    assert not (tmp_path / "run").exists()


def test_rerun_rewrites_missing_truncated_and_corrupt_shards(setup, inproc, tmp_path, caplog):
    """`inspect --verify` says to re-run the dump: the rerun must find and rewrite what it names."""
    out = tmp_path / "cache"
    shutil.copytree(inproc, out)
    (out / "shard-00000.h5").unlink()
    truncated = out / "shard-00001.h5"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    corrupt = out / "shard-00002.h5"
    with h5py.File(corrupt, "r") as f:
        at = f["heatmaps"].id.get_chunk_info(1).byte_offset + 5  # inside row 1's deflated heatmaps
    data = bytearray(corrupt.read_bytes())
    data[at] ^= 0x01  # same size, valid HDF5: only the checksum sees it
    corrupt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kdcache.dump"):
        dump_teacher(_cfg(setup, out))  # sizes and headers are always checked
    assert "shard-00000.h5: missing" in caplog.text and "shard-00001.h5: " in caplog.text
    assert "shard-00002.h5" not in caplog.text
    assert verify_cache(out) == ["shard-00002.h5: checksum mismatch (corrupt)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdcache.dump"):
        dump_teacher(_cfg(setup, out), verify=True)
    assert "rewriting damaged shard shard-00002.h5: checksum mismatch" in caplog.text
    assert verify_cache(out) == [] and _shards(out) == _shards(inproc)
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("victim, fail_at, listed", [("shard-00002.h5.tmp", 1, [0, 1]),
                                                     ("manifest.json.tmp", 3, [0])],  # 1: created, 2: +shard 0
                         ids=["shard", "manifest"])
def test_full_disk_keeps_complete_shards_and_the_rerun_finishes(setup, inproc, tmp_path, monkeypatch,
                                                                victim, fail_at, listed):
    out = tmp_path / "cache"
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:  # the disk fills up while `victim` is written
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == victim:
            calls.append(fd)
            if len(calls) == fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        dump_teacher(_cfg(setup, out))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out / victim)
    assert not list(out.glob("*.tmp"))
    manifest, shards = _shards(out)
    ref_manifest, ref_shards = _shards(inproc)
    assert [s["index"] for s in manifest["shards"]] == listed and not manifest["complete"]
    assert shards == {name: ref_shards[name] for name in shards}
    assert verify_cache(out) == [f"incomplete: {len(listed)} of {ref_manifest['num_shards']} shards"]
    monkeypatch.undo()  # the disk has room again
    dump_teacher(_cfg(setup, out))
    assert _shards(out) == (ref_manifest, ref_shards) and not list(out.glob("*.tmp"))


def test_inputs_are_checked_before_the_teacher_loads(setup, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the inputs were checked")

    monkeypatch.setattr("kdcache.dump.load_teacher", never)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(UserError, match=f"--out {a_file} is a file, not a folder; choose a folder"):
        dump_teacher(_cfg(setup, a_file))
    with pytest.raises(UserError, match=f"cannot write into --out {a_file / 'cache'} .*choose a folder you can"):
        dump_teacher(_cfg(setup, a_file / "cache"))  # its parent is a file
    real_probe = tempfile.TemporaryFile

    def locked_folder(*args, dir=None, **kwargs):  # root writes anywhere: the folder reads as locked to all here
        if dir is not None and Path(dir).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_probe(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", locked_folder)
    with pytest.raises(UserError, match="Permission denied"):
        dump_teacher(_cfg(setup, tmp_path / "locked"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files \\(notes.txt\\) and no kdcache cache"):
        dump_teacher(_cfg(setup, other))
    with pytest.raises(UserError, match="--images .*nowhere is not a folder"):
        dump_teacher(_cfg(setup, tmp_path / "cache", tmp_path / "nowhere"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # the write probe left nothing


def test_crop_none_refuses_replay_from_changed_images(setup, tmp_path, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    out = tmp_path / "none"
    dump_teacher(_cfg(setup, out, images, crop_format="none"))
    with h5py.File(out / "shard-00000.h5", "r") as f:  # the contract: readable with h5py alone
        names = [name.decode() for name in f["image_file"][:]]
        image_hw, image_sha = f["image_hw"][:], f["image_sha256"][:]
    assert image_hw.dtype == np.int32 and image_sha.shape == (len(names), 32)
    for name, hw, sha in zip(names, image_hw, image_sha):
        assert list(hw) == list(cv2.imread(str(images / name)).shape[:2])
        assert sha.tobytes().hex() == hashlib.sha256((images / name).read_bytes()).hexdigest()

    hashed, real = [], fmt.sha256_file
    monkeypatch.setattr(fmt, "sha256_file", lambda path: hashed.append(path) or real(path))
    cache = open_cache(out)
    crops = [cache[i]["crop"] for i in range(len(cache))]
    assert len(hashed) == len({inst.file_name for inst in setup["instances"]})  # once per image, not per row

    first, last = setup["instances"][0].file_name, setup["instances"][-1].file_name
    image = cv2.imread(str(images / first))
    image[:8, :8] = 255 - image[:8, :8]
    cv2.imwrite(str(images / first), image)  # same size, other pixels
    fresh = open_cache(out)  # as in a new process
    with pytest.raises(UserError, match=f"image {images / first} has changed since cache {out} was dumped "
                                        "\\(same size, other content.*restore the images .*or dump the teacher again"):
        fresh[0]
    image = cv2.imread(str(images / last))
    h, w = image.shape[:2]
    cv2.imwrite(str(images / last), cv2.resize(image, (w + 8, h)))
    with pytest.raises(UserError, match=f"{last} has changed .*it is {h}x{w + 8} \\(HxW\\) pixels, the cache's was {h}x{w}"):
        fresh[len(cache) - 1]
    before = len(hashed)
    cache[0]  # this reader checked image 0 before it changed: the verdict stands, no new hash
    assert len(hashed) == before
    cache.close(), fresh.close()

    for shard in out.glob("shard-*.h5"):  # a cache dumped before these datasets existed: replayed unchecked
        with h5py.File(shard, "a") as f:
            del f["image_hw"], f["image_sha256"]
    assert open_cache(out)[0]["crop"].shape == crops[0].shape


# ---- people without ground truth: detector boxes, annotated boxes without keypoints ----------------------

@pytest.fixture(scope="module")
def unlabelled(setup):
    """A synthetic unlabelled split (images, image-info file, detections) and a boxes-only dump of it."""
    from kdcache.synth import SynthConfig, synthesize

    data = synthesize(SynthConfig(out=setup["root"] / "u", train_images=0, val_images=0, unlabelled_images=4,
                                  max_people=2, seed=3))
    u = {"info": data / "annotations/image_info_unlabelled.json", "images": data / "unlabelled",
         "dets": data / "annotations/detections_unlabelled.json"}
    u["args"] = lambda out, *extra: ["dump-teacher", "--teacher", str(setup["teacher"]), "--ann", str(u["info"]),
                                     "--boxes", str(u["dets"]), "--images", str(u["images"]), "--out", str(out),
                                     *DUMP, *extra]
    u["reference"] = setup["root"] / "u_reference"
    subprocess.run(_cli(u["args"](u["reference"])), env=ENV, check=True, timeout=300)
    return u


def _rows(path):
    cache = open_cache(path)
    return [cache[i] for i in range(len(cache))]


def test_boxes_dump_rows_carry_no_ground_truth_and_the_box_score(unlabelled, tmp_path, capsys):
    import json

    dets = json.loads(unlabelled["dets"].read_text())
    manifest, rows = fmt.read_manifest(unlabelled["reference"]), _rows(unlabelled["reference"])
    kept = [d for d in dets if d["bbox"][2] > 0 and d["bbox"][3] > 0]  # the synthetic detector clips to the image
    assert manifest["persons"] == {"source": "detections", "instances": len(kept), "labelled": 0,
                                   "unlabelled": len(kept)}
    assert len(rows) == 3 * len(kept) and manifest["schema_version"] == 4
    for row in rows:
        det = dets[row["ann_id"] - 1]  # a row's ann_id is its box's 1-based position in the detection file
        assert row["image_id"] == det["image_id"] and row["box_score"] == pytest.approx(det["score"])
        assert not row["labelled"] and not row["keypoints"][:, 2].any()  # all visibilities 0
    # A score threshold keeps a subset of the people, each with the very same views.
    out = tmp_path / "thr"
    assert main(unlabelled["args"](out, "--box-score-thr", "0.5")) == 0
    high = _rows(out)
    assert 0 < len(high) < len(rows) and all(row["box_score"] >= 0.5 for row in high)
    by_view = {(r["ann_id"], r["view"]): r for r in rows}
    for row in high:
        np.testing.assert_array_equal(row["affine"], by_view[(row["ann_id"], row["view"])]["affine"])
        np.testing.assert_array_equal(row["heatmaps"], by_view[(row["ann_id"], row["view"])]["heatmaps"])
    # Half-body crops need keypoints: asking for them on every view changes nothing here.
    out = tmp_path / "half"
    assert main(unlabelled["args"](out, "--half-body-prob", "1.0")) == 0
    assert [r["affine"].tolist() for r in _rows(out)] == [r["affine"].tolist() for r in rows]
    capsys.readouterr()
    assert main(["inspect", str(unlabelled["reference"])]) == 0
    shown = capsys.readouterr().out
    assert (f"{len(kept)} from detections: 0 with ground truth, {len(kept)} without (their rows carry no ground "
            "truth; half-body crops, which need keypoints, skipped for them)") in shown


def test_boxes_dump_is_sharded_and_resumed_like_a_labelled_one(unlabelled, tmp_path):
    out = tmp_path / "ranks"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdcache"]
    result = subprocess.run(launch + unlabelled["args"](out), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _shards(out) == _shards(unlabelled["reference"])  # manifest and every shard's bytes
    (out / fmt.shard_name(1)).unlink()  # a lost shard: the same command writes it again, byte for byte
    subprocess.run(_cli(unlabelled["args"](out)), env=ENV, check=True, timeout=300)
    assert _shards(out) == _shards(unlabelled["reference"])


def test_persons_without_keypoints_of_an_annotation_file(setup, tmp_path, capsys, error_line):
    """COCO instances_*.json-style persons: boxes, no keypoints; --persons picks them, or all people."""
    import json

    doc = json.loads(setup["ann"].read_text())
    stripped = [a["id"] for a in doc["annotations"][::2]]
    for ann in doc["annotations"][::2]:
        del ann["keypoints"], ann["num_keypoints"]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(doc))
    base = ["dump-teacher", "--teacher", str(setup["teacher"]), "--ann", str(ann_file), "--images",
            str(setup["images"]), *DUMP]
    for persons, expect in (("unlabelled", set(stripped)), ("all", {a["id"] for a in doc["annotations"]}),
                            ("labelled", {a["id"] for a in doc["annotations"]} - set(stripped))):
        out = tmp_path / persons
        assert main([*base, "--out", str(out), "--persons", persons]) == 0
        rows = _rows(out)
        assert {r["ann_id"] for r in rows} == expect
        for row in rows:
            assert row["labelled"] == (row["ann_id"] not in stripped) and row["box_score"] == 1.0
            assert row["labelled"] == bool(row["keypoints"][:, 2].any())
    for ann in doc["annotations"]:  # no keypoint anywhere: the default names what to pass
        ann.pop("keypoints", None), ann.pop("num_keypoints", None)
    ann_file.write_text(json.dumps(doc))
    assert main([*base, "--out", str(tmp_path / "none")]) == 2
    line = error_line()
    assert "has no usable person with keypoints" in line and "pass --persons unlabelled" in line


def test_boxes_inputs_are_checked_before_the_teacher_loads(setup, unlabelled, tmp_path, monkeypatch, capsys,
                                                           error_line):
    def never(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the inputs were checked")

    monkeypatch.setattr("kdcache.dump.load_teacher", never)
    base = ["dump-teacher", "--teacher", str(setup["teacher"]), "--ann", str(unlabelled["info"]), "--images",
            str(unlabelled["images"]), "--out", str(tmp_path / "c"), *DUMP]
    for extra, message in (
            ([], "holds no annotated people (an image-info file?): pass --boxes DETS.json"),
            (["--boxes", str(tmp_path / "nowhere.json")], "nowhere.json does not exist"),
            (["--boxes", str(unlabelled["dets"]), "--box-score-thr", "0.999"],
             "nothing to dump: no person box of the"),
            (["--boxes", str(unlabelled["dets"]), "--persons", "unlabelled"],
             "--persons chooses among --ann's annotated people, --boxes replaces them"),
            (["--boxes", str(unlabelled["dets"]), "--box-score-thr", "1.5"], "argument --box-score-thr")):
        assert main([*base, *extra]) == 2
        assert message in error_line()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == []  # nothing written
