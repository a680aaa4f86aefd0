"""Every command on tiny data, through `kdcache.cli.main` exactly as a user types it."""

import json

import numpy as np
import pytest
import torch

from kdcache.cache import open_cache
from kdcache.cache_format import read_manifest
from kdcache.cli import main
from kdcache.coco import load_instances

SIZE = ["--input-size", "128x96"]
QUIET = ["--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """synth -> train-teacher -> dump-teacher -> train-student, each a few steps."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    assert main(["synth", "--out", str(data), "--train-images", "4", "--val-images", "2", "--seed", "1"]) == 0
    train = ["--ann", str(data / "annotations/person_keypoints_train.json"), "--images", str(data / "train")]
    val = ["--val-ann", str(data / "annotations/person_keypoints_val.json"), "--val-images", str(data / "val")]
    assert main(["train-teacher", *train, "--out", str(root / "teacher"), "--arch", "vitpose-nano", *SIZE,
                 "--max-steps", "2", "--batch-size", "4", *QUIET]) == 0
    assert main(["dump-teacher", "--teacher", str(root / "teacher/best.pt"), *train, "--out", str(root / "cache"),
                 "--views", "3", "--shard-size", "5", "--batch-size", "4", *QUIET]) == 0
    assert main(["train-student", "--cache", str(root / "cache"), "--student", "mobilenetv3_small_100",
                 "--out", str(root / "student"), "--max-steps", "2", "--batch-size", "4", "--head-channels", "32",
                 *val, *QUIET]) == 0
    return {"root": root, "data": data, "train": train, "val": val}


def test_teacher_run_folder(pipeline):
    run = pipeline["root"] / "teacher"
    assert {"config.json", "last.pt", "best.pt", "metrics.csv"} <= {p.name for p in run.iterdir()}
    ckpt = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)  # no validation set: the last weights, nothing else
    assert all(torch.equal(best["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    assert ckpt["format"] == "kdcache" and ckpt["kind"] == "vitpose" and ckpt["step"] == 2
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["arch"] == "vitpose-nano" and "git_rev" in config


def test_dump_holds_every_view_once(pipeline):
    cache = open_cache(pipeline["root"] / "cache")
    instances = load_instances(pipeline["data"] / "annotations/person_keypoints_train.json")
    keys = [(cache[i]["ann_id"], cache[i]["view"]) for i in range(len(cache))]
    assert sorted(keys) == sorted((inst.ann_id, v) for inst in instances for v in range(3))
    row = cache[0]
    assert row["crop"].shape == (128, 96, 3) and row["heatmaps"].shape == (17, 32, 24)
    assert row["view"] == 0 and not row["flip"]


def test_dump_rerun_resumes_to_identical_cache(pipeline, tmp_path):
    """Drop a shard from the manifest (as if killed before it completed): the rerun rewrites it bit for bit."""
    cache_dir = pipeline["root"] / "cache"
    manifest = read_manifest(cache_dir)
    lost = manifest["shards"][1]
    before = (cache_dir / lost["name"]).read_bytes()
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] != lost["index"]]
    manifest["complete"] = False
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    (cache_dir / lost["name"]).unlink()
    assert main(["dump-teacher", "--teacher", str(pipeline["root"] / "teacher/best.pt"), *pipeline["train"],
                 "--out", str(cache_dir), "--views", "3", "--shard-size", "5", "--batch-size", "4", *QUIET]) == 0
    assert (cache_dir / lost["name"]).read_bytes() == before
    after = read_manifest(cache_dir)
    assert after["complete"] and [s["index"] for s in after["shards"]] == list(range(after["num_shards"]))
    assert [s for s in after["shards"] if s["index"] == lost["index"]][0]["sha256"] == lost["sha256"]


def test_dump_refuses_other_settings(pipeline, capsys):
    code = main(["dump-teacher", "--teacher", str(pipeline["root"] / "teacher/best.pt"), *pipeline["train"],
                 "--out", str(pipeline["root"] / "cache"), "--views", "2", *QUIET])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdcache")]
    assert code == 2 and len(err) == 1 and "other settings" in err[0]


def test_cached_targets_match_teacher(pipeline):
    """What the cache holds is the teacher's output on the stored crop (up to JPEG and quantisation)."""
    from kdcache.models import load_model
    from kdcache.inference import to_input_tensor

    cache = open_cache(pipeline["root"] / "cache")
    teacher = load_model(pipeline["root"] / "teacher/best.pt")
    row = cache[1]
    with torch.no_grad():
        out = teacher(to_input_tensor(row["crop"][None]))[0].numpy()
    rel = np.linalg.norm(out - row["heatmaps"]) / np.linalg.norm(out)
    assert rel < 0.1


def test_student_run_with_validation(pipeline):
    run = pipeline["root"] / "student"
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["kind"] == "student" and ckpt["model_config"]["backbone"] == "mobilenetv3_small_100"
    assert ckpt["val_ap"] is not None
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,loss") and rows[-1].split(",")[-1] != ""


def test_online_student(pipeline):
    root = pipeline["root"]
    assert main(["train-student", "--online-teacher", str(root / "teacher/best.pt"), *pipeline["train"],
                 "--student", "mobilenetv3_small_100", *SIZE, "--out", str(root / "online"), "--max-steps", "1",
                 "--batch-size", "4", "--head-channels", "32", *QUIET]) == 0
    assert torch.load(root / "online/last.pt", weights_only=True)["step"] == 1


def test_eval_writes_metrics_and_results(pipeline, capsys):
    root, data = pipeline["root"], pipeline["data"]
    args = ["eval", "--model", str(root / "student/best.pt"),
            "--ann", str(data / "annotations/person_keypoints_val.json"), "--images", str(data / "val"), "--metrics-out", str(root / "m.json"), "--results-out", str(root / "r.json"),
            "--workers", "0", "--flip-test"]
    assert main(args) == 0
    metrics = json.loads((root / "m.json").read_text())
    assert {"AP", "AP50", "AP75", "APm", "APl", "AR"} <= metrics.keys()
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    results = json.loads((root / "r.json").read_text())
    n_val = len(load_instances(data / "annotations/person_keypoints_val.json"))
    assert 0 < len(results) <= n_val and all(len(r["keypoints"]) == 51 for r in results)
    assert "AP @[IoU=0.50:0.95 | area=all]" in capsys.readouterr().out


def test_inspect_summary_verify_and_png(pipeline, capsys):
    cache_dir = pipeline["root"] / "cache"
    png = pipeline["root"] / "sheet.png"
    assert main(["inspect", str(cache_dir), "--verify", "--png", str(png), "--count", "4"]) == 0
    out = capsys.readouterr().out
    assert "views" in out and "kb_per_view" in out and png.stat().st_size > 1000


def test_verbose_logging_has_no_h5py_noise(pipeline, capsys):
    assert main(["-v", "inspect", str(pipeline["root"] / "cache"), "--verify"]) == 0
    err = capsys.readouterr().err
    assert "h5py" not in err  # its converter DEBUG lines ("Creating converter from 3 to 5") are not ours


def test_inspect_verify_names_corrupt_shard(pipeline, tmp_path, capsys):
    import shutil

    broken = tmp_path / "cache"
    shutil.copytree(pipeline["root"] / "cache", broken)
    shard = broken / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(broken), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "shard-00000.h5" in captured.out and "failed verification" in captured.err


def test_bench_table(pipeline, capsys):
    root = pipeline["root"]
    assert main(["bench", str(root / "teacher/best.pt"), str(root / "student/best.pt"), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "teacher/best.pt" in out and "student/best.pt" in out


def test_export_onnx(pipeline, capsys):
    pytest.importorskip("onnxruntime")
    root = pipeline["root"]
    assert main(["export", "--model", str(root / "student/best.pt"), "--onnx", str(root / "s.onnx")]) == 0
    assert (root / "s.onnx").stat().st_size > 10000 and "max abs difference" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--model", "nope.pt", "--ann", "nope.json", "--images", "."], "nope"),
    (["train-student", "--cache", "no_cache_here", "--student", "mobilenetv3_small_100", "--out", "x"],
     "no_cache_here"),
    (["inspect", "no_cache_here"], "no_cache_here"),
    (["train-student", "--ann", "a.json", "--images", ".", "--student", "mobilenetv3_small_100", "--out", "x",
      "--blur", "2"], "argument --blur: must be >= 0 and <= 1, got 2"),
])
def test_user_errors_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdcache")]  # log lines aside
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "| teacher vitpose-nano |" in out and "| student mobilenetv3_small_100 |" in out
    assert json.loads((tmp_path / "demo/results.json").read_text())["rows"][0]["params_m"] > 0


@pytest.mark.parametrize("epochs, extra, jitter", [(2, [], 0.0), (3, [], 0.5), (3, ["--jitter", "0"], 0.0),
                                                   (3, ["--train-views", "1", "--epochs", "1"], 0.0)])
def test_jitter_defaults_on_when_cached_views_are_replayed(pipeline, tmp_path, epochs, extra, jitter):
    """The cache holds 2 training views: a third epoch replays one, and jitter then comes on by default."""
    out = tmp_path / "run"
    assert main(["train-student", "--cache", str(pipeline["root"] / "cache"), "--student", "mobilenetv3_small_100",
                 "--out", str(out), "--epochs", str(epochs), "--max-steps", "1", "--batch-size", "4",
                 "--head-channels", "16", *extra, *QUIET]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["student_aug"]["jitter_prob"] == jitter


def test_student_trains_on_a_labelled_cache_and_a_boxes_cache_together(pipeline, tmp_path, nano_teacher, capsys,
                                                                        error_line):
    """A second cache dumped from detector-like boxes (the validation people's, without their keypoints)."""
    root, data = pipeline["root"], pipeline["data"]
    val_ann = data / "annotations/person_keypoints_val.json"
    dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.8}
            for a in json.loads(val_ann.read_text())["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    boxes = ["--ann", str(val_ann), "--boxes", str(tmp_path / "dets.json"), "--images", str(data / "val"),
             "--views", "3", "--batch-size", "4", *QUIET]
    assert main(["dump-teacher", "--teacher", str(root / "teacher/best.pt"), "--out", str(tmp_path / "u"),
                 *boxes]) == 0
    student = ["train-student", "--student", "mobilenetv3_small_100", "--batch-size", "4", "--head-channels", "16",
               "--cache", str(root / "cache"), *QUIET]
    assert main([*student, "--cache", str(tmp_path / "u"), "--cache-weight", "1", "--cache-weight", "2",
                 "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    config = json.loads((tmp_path / "run/config.json").read_text())["config"]
    assert config["caches"] == [str(root / "cache"), str(tmp_path / "u")] and config["cache_weights"] == [1.0, 2.0]
    labelled, unlabelled = len(load_instances(data / "annotations/person_keypoints_train.json")), len(dets)
    steps = (labelled + 2 * unlabelled) // 4  # an epoch: each labelled person once, each boxed person twice
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == steps
    capsys.readouterr()
    # Every cache is checked: weights one per cache, integrity, and the student's codec.
    assert main([*student, "--cache", str(tmp_path / "u"), "--cache-weight", "1", "--out", str(tmp_path / "r")]) == 2
    assert "1 --cache-weight for 2 --cache; give one weight per cache" in error_line()
    other = nano_teacher((64, 64))
    assert main(["dump-teacher", "--teacher", str(other), "--out", str(tmp_path / "u64"), *boxes]) == 0
    capsys.readouterr()
    assert main([*student, "--cache", str(tmp_path / "u64"), "--out", str(tmp_path / "r")]) == 2
    assert f"cache {tmp_path / 'u64'} does not match the student" in error_line()
    (tmp_path / "u/shard-00000.h5").write_bytes(b"broken")
    assert main([*student, "--cache", str(tmp_path / "u"), "--out", str(tmp_path / "r")]) == 2
    assert f"cache {tmp_path / 'u'} is damaged" in error_line()
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_tokenpose_teacher_end_to_end_keeps_its_codec(pipeline, tmp_path, capsys):
    """A TokenPose teacher trained here is dumped, distilled (cached and online) and evaluated, and every stage uses
    TokenPose's codec: its crops, its targets, the student's decoding."""
    from kdcache.codec import TokenPoseHeatmap
    from kdcache.inference import to_input_tensor
    from kdcache.models import load_model
    from kdcache.transforms import bbox_to_center_scale

    data, train, val = pipeline["data"], pipeline["train"], pipeline["val"]
    assert main(["train-teacher", *train, "--out", str(tmp_path / "teacher"), "--arch", "tokenpose-nano", *SIZE,
                 "--max-steps", "2", "--batch-size", "4", *QUIET]) == 0
    teacher_file = tmp_path / "teacher/last.pt"
    assert torch.load(teacher_file, weights_only=True)["kind"] == "tokenpose"
    assert main(["dump-teacher", "--teacher", str(teacher_file), *train, "--out", str(tmp_path / "cache"),
                 "--views", "2", "--batch-size", "4", *QUIET]) == 0
    cache = open_cache(tmp_path / "cache")
    codec = TokenPoseHeatmap.for_input((128, 96))
    assert cache.codec == codec
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cache")]) == 0
    assert "codec              tokenpose-heatmap" in capsys.readouterr().out.splitlines()
    row = next(cache[i] for i in range(len(cache)) if cache[i]["view"] == 0)
    box = next(i.bbox_xywh for i in load_instances(data / "annotations/person_keypoints_train.json")
               if i.ann_id == row["ann_id"])
    assert np.allclose(row["affine"], codec.crop_affine(*bbox_to_center_scale(box), 0.0), atol=1e-6)
    teacher = load_model(teacher_file)
    with torch.no_grad():
        out = teacher(to_input_tensor(row["crop"][None]))[0].numpy()
    assert np.linalg.norm(out - row["heatmaps"]) / np.linalg.norm(out) < 0.1
    assert main(["train-student", "--cache", str(tmp_path / "cache"), "--student", "mobilenetv3_small_100",
                 "--out", str(tmp_path / "student"), "--max-steps", "2", "--batch-size", "4", "--head-channels", "32",
                 *QUIET]) == 0
    assert main(["train-student", "--online-teacher", str(teacher_file), *train, "--student", "mobilenetv3_small_100",
                 *SIZE, "--out", str(tmp_path / "online"), "--max-steps", "1", "--batch-size", "4",
                 "--head-channels", "32", *QUIET]) == 0
    for run in ("student", "online"):
        assert torch.load(tmp_path / run / "last.pt", weights_only=True)["model_config"]["codec"] == codec.name
        assert load_model(tmp_path / run / "last.pt").codec == codec
    for model in (tmp_path / "student/last.pt", teacher_file):
        assert main(["eval", "--model", str(model), "--ann", val[1], "--images", val[3],
                     "--metrics-out", str(tmp_path / "m.json"), "--workers", "0"]) == 0
        assert np.isfinite(json.loads((tmp_path / "m.json").read_text())["AP"])


def fourteen_layout(coco_file, out_file, keypoint_set):
    """A CrowdPose- or AIC-layout copy of a COCO-17 file: the set's 14 names, its 12 limb joints taken from COCO's by
    name, head (the nose stands in) and neck (between the shoulders), and no `area` (neither dataset has one)."""
    from kdcache.keypoints import COCO_17

    coco = json.loads(coco_file.read_text())
    coco["categories"] = [{**coco["categories"][0], "keypoints": list(keypoint_set.names), "skeleton": []}]
    for ann in coco["annotations"]:
        k = np.asarray(ann["keypoints"], float).reshape(17, 3)
        neck = [*(k[5, :2] + k[6, :2]) / 2, min(k[5, 2], k[6, 2])]
        joint = {name: k[i] for i, name in enumerate(COCO_17.names)} | {"head": k[0], "head_top": k[0], "neck": neck}
        ann["keypoints"] = np.concatenate([joint[name] for name in keypoint_set.names]).ravel().tolist()
        ann["num_keypoints"] = int((np.asarray(ann["keypoints"])[2::3] > 0).sum())
        ann.pop("area", None)
    out_file.write_text(json.dumps(coco))
    return out_file


@pytest.mark.parametrize("name", ["crowdpose-14", "aic-14"])
def test_a_14_keypoint_file_runs_through_train_dump_distil_and_eval(pipeline, tmp_path, name):
    """The teacher and the student predict the file's 14 joints; the cache and the student record its set;
    eval scores with the set's sigmas and refuses the student on a COCO-17 file."""
    from kdcache.keypoints import keypoint_set

    data = pipeline["data"]
    train_ann = fourteen_layout(data / "annotations/person_keypoints_train.json", tmp_path / "train14.json",
                                keypoint_set(name))
    val_ann = fourteen_layout(data / "annotations/person_keypoints_val.json", tmp_path / "val14.json",
                              keypoint_set(name))
    train = ["--ann", str(train_ann), "--images", str(data / "train")]
    assert main(["train-teacher", *train, "--out", str(tmp_path / "teacher"), "--arch", "vitpose-nano", *SIZE,
                 "--max-steps", "2", "--batch-size", "4", *QUIET]) == 0
    teacher = torch.load(tmp_path / "teacher/last.pt", weights_only=True)
    assert teacher["model_config"]["num_keypoints"] == 14
    assert main(["dump-teacher", "--teacher", str(tmp_path / "teacher/last.pt"), *train, "--out", str(tmp_path / "c"),
                 "--views", "2", "--batch-size", "4", *QUIET]) == 0
    cache = open_cache(tmp_path / "c")
    assert cache.keypoint_set.name == name and cache[0]["heatmaps"].shape == (14, 32, 24)
    assert main(["train-student", "--cache", str(tmp_path / "c"), "--student", "mobilenetv3_small_100",
                 "--out", str(tmp_path / "s"), "--max-steps", "2", "--batch-size", "4", "--head-channels", "32",
                 *QUIET]) == 0
    config = torch.load(tmp_path / "s/last.pt", weights_only=True)["model_config"]
    assert (config["num_keypoints"], config["keypoint_set"]) == (14, name)
    assert main(["eval", "--model", str(tmp_path / "s/last.pt"), "--ann", str(val_ann), "--images", str(data / "val"),
                 "--metrics-out", str(tmp_path / "m.json"), "--workers", "0"]) == 0
    assert np.isfinite(json.loads((tmp_path / "m.json").read_text())["AP"])
    assert main(["eval", "--model", str(tmp_path / "s/last.pt"), "--ann", pipeline["val"][1],
                 "--images", pipeline["val"][3], "--workers", "0"]) == 2


def test_a_set_kdcache_does_not_know_runs_by_its_description_file(pipeline, tmp_path, capsys):
    """A 5-keypoint head set: refused without --keypoint-set (one line naming the flag); with its description
    file the teacher, the cache (which holds the description whole), the student and eval follow it."""
    data = pipeline["data"]
    head = ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]

    def head_layout(src, dst):
        coco = json.loads(src.read_text())
        coco["categories"] = [{**coco["categories"][0], "keypoints": [f"{n}_point" for n in head], "skeleton": []}]
        for ann in coco["annotations"]:
            ann["keypoints"] = ann["keypoints"][:15]
            ann["num_keypoints"] = int((np.asarray(ann["keypoints"])[2::3] > 0).sum())
        dst.write_text(json.dumps(coco))
        return str(dst)

    train = ["--ann", head_layout(data / "annotations/person_keypoints_train.json", tmp_path / "t.json"),
             "--images", str(data / "train")]
    val = ["--ann", head_layout(data / "annotations/person_keypoints_val.json", tmp_path / "v.json"),
           "--images", str(data / "val")]
    teacher = ["train-teacher", *train, "--out", str(tmp_path / "teacher"), "--arch", "vitpose-nano", *SIZE,
               "--max-steps", "2", "--batch-size", "4", *QUIET]
    capsys.readouterr()
    assert main(teacher) == 2
    assert "has 5 keypoints per person" in (err := capsys.readouterr().err) and "--keypoint-set FILE.json" in err
    described = {"name": "head-5", "keypoints": [f"{n}_point" for n in head], "sigmas": [0.026, 0.025, 0.025,
                                                                                        0.035, 0.035]}
    (tmp_path / "head5.json").write_text(json.dumps(described))
    chosen = ["--keypoint-set", str(tmp_path / "head5.json")]
    assert main([*teacher, *chosen]) == 0
    assert main(["dump-teacher", "--teacher", str(tmp_path / "teacher/last.pt"), *train, *chosen,
                 "--out", str(tmp_path / "c"), "--views", "2", "--batch-size", "4", *QUIET]) == 0
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    assert manifest["keypoint_set"] == "head-5" and manifest["keypoint_set_description"]["sigmas"][3] == 0.035
    cache = open_cache(tmp_path / "c")  # read back from the manifest alone: flip pairs from the names
    assert cache.keypoint_set.flip_pairs == ((1, 2), (3, 4)) and cache[0]["heatmaps"].shape == (5, 32, 24)
    assert main(["train-student", "--cache", str(tmp_path / "c"), "--student", "mobilenetv3_small_100",
                 "--out", str(tmp_path / "s"), "--max-steps", "2", "--batch-size", "4", "--head-channels", "32",
                 *QUIET]) == 0
    assert torch.load(tmp_path / "s/last.pt", weights_only=True)["model_config"]["keypoint_set"] == "head-5"
    assert main(["eval", "--model", str(tmp_path / "s/last.pt"), *val, *chosen,
                 "--metrics-out", str(tmp_path / "m.json"), "--workers", "0"]) == 0
    assert np.isfinite(json.loads((tmp_path / "m.json").read_text())["AP"])
    capsys.readouterr()  # a set the file names itself wins; a contradicting flag is one line
    assert main(["eval", "--model", str(tmp_path / "s/last.pt"), "--ann", pipeline["val"][1],
                 "--images", pipeline["val"][3], *chosen, "--workers", "0"]) == 2
    assert "names COCO's keypoints but --keypoint-set is head-5" in capsys.readouterr().err
