"""Trainer: resume after a crash reaching the same weights as an uninterrupted run."""

import dataclasses

import numpy as np

import pytest
import torch

import kdcache.sources as sources_mod
from kdcache.config import OptimConfig, RunConfig, TrainTeacherConfig
from kdcache.student import NAMED_STUDENTS
from kdcache.train import train_teacher


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, ema, synth_data):
    data = synth_data(4, 0, 2)
    cfg = TrainTeacherConfig(ann=data / "annotations/person_keypoints_train.json", images=data / "train",
                             run=RunConfig(out=tmp_path / "a", workers=0, progress=False), arch="vitpose-nano",
                             input_hw=(64, 64), optim=OptimConfig(epochs=3, batch_size=2, lr=1e-3, warmup_steps=2,
                                                                  ema=ema))
    train_teacher(cfg)
    steps_per_epoch = torch.load(tmp_path / "a/last.pt", weights_only=True)["step"] // 3

    calls = {"n": 0}
    real_loss = sources_mod.heatmap_mse

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 1:  # first step of the third epoch
            raise RuntimeError("simulated crash")
        return real_loss(*args, **kwargs)

    crashed = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=tmp_path / "b"))
    monkeypatch.setattr(sources_mod, "heatmap_mse", crashing_loss)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_teacher(crashed)
    assert torch.load(tmp_path / "b/last.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(sources_mod, "heatmap_mse", real_loss)
    train_teacher(dataclasses.replace(crashed, run=dataclasses.replace(crashed.run, resume=True)))

    a = torch.load(tmp_path / "a/last.pt", weights_only=True)
    b = torch.load(tmp_path / "b/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 3 * steps_per_epoch
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    if ema:  # the checkpoint holds the average, and the raw weights to resume from
        assert not torch.equal(a["state_dict"]["backbone.pos_embed"], a["train_state_dict"]["backbone.pos_embed"])
        for key, value in a["train_state_dict"].items():
            assert torch.equal(value, b["train_state_dict"][key]), key
    rows = (tmp_path / "b/metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2", "3"]


# ------------------------------------------------------------------------------------------- students

INPUT_HW = (64, 64)


@pytest.fixture(scope="module")
def tiny(student_cache):
    """Six instances, a nano teacher, and its cache of 3 views per instance (64x64: fast)."""
    return student_cache()


def test_a_cached_epoch_is_one_view_per_instance_cycling_the_augmented_views(tiny):
    from kdcache.cache import open_cache
    from kdcache.data import CachedDataset

    rows = open_cache(tiny["cache"])
    dataset = CachedDataset(rows, flip_prob=0.0, seed=0)
    assert len(dataset) == len(rows) // 3 == 6
    views = []
    for epoch in range(5):
        dataset.set_epoch(epoch)
        row = rows[dataset.row_of(4)]
        assert row["ann_id"] == rows[4 * 3]["ann_id"]
        np.testing.assert_array_equal(dataset[4]["crop"], row["crop"])
        np.testing.assert_array_equal(dataset[4]["teacher_confidence"], row["confidence"])
        views.append(int(row["view"]))
    assert views == [1, 2, 1, 2, 1]  # the views an online run draws first; never the plain view 0


def test_train_views_restricts_epochs_to_the_first_k_views(tiny):
    from kdcache.cache import open_cache
    from kdcache.data import CachedDataset
    from kdcache.errors import UserError

    rows = open_cache(tiny["cache"])
    dataset = CachedDataset(rows, flip_prob=0.0, seed=0, train_views=1)
    views = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        views.append(int(rows[dataset.row_of(2)]["view"]))
    assert views == [1, 1, 1, 1]
    for bad in (3, -1):  # the cache has 2 augmented views
        with pytest.raises(UserError, match=r"holds 2 augmented views per instance; pass 1\.\.2"):
            CachedDataset(rows, flip_prob=0.0, seed=0, train_views=bad)


def _student_cfg(tiny, out, backbone="mobilenetv3_small_100", **kwargs):
    from kdcache.config import TrainStudentConfig
    from kdcache.student import StudentConfig

    return TrainStudentConfig(student=StudentConfig(backbone, input_hw=INPUT_HW, head_channels=16),
                              run=RunConfig(out=out, workers=0, progress=False),
                              optim=OptimConfig(epochs=1, batch_size=3, warmup_steps=1), **kwargs)


def test_ground_truth_only_student_never_calls_the_teacher_loss(tiny, tmp_path, monkeypatch):
    from kdcache.losses import KDConfig
    from kdcache.train import train_student

    def no_kd(*args, **kwargs):
        raise AssertionError("distillation loss used without a teacher")

    monkeypatch.setattr(sources_mod, "distillation_loss", no_kd)
    run = train_student(_student_cfg(tiny, tmp_path / "gt", ann=tiny["ann"], images=tiny["images"],
                                     kd=KDConfig(alpha=0.5)))
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2


def test_online_teacher_sees_clean_crops_while_the_student_sees_photometric_changes(tiny, tmp_path, monkeypatch):
    import kdcache.train as train_mod
    from kdcache.augment import StudentAugConfig
    from kdcache.codec import UDPHeatmap
    from kdcache.coco import load_instances
    from kdcache.data import ViewDataset
    from kdcache.inference import to_input_tensor
    from kdcache.keypoints import COCO_17
    from kdcache.teacher import load_teacher
    from kdcache.train import train_student
    from kdcache.transforms import AugmentConfig, ViewSampler

    seen = {"teacher": [], "student": []}
    teacher = load_teacher(tiny["teacher"])
    teacher.register_forward_hook(lambda m, args, out: seen["teacher"].append(args[0].clone()))
    monkeypatch.setattr(sources_mod, "load_teacher", lambda *a, **k: teacher)
    real_build = train_mod.build_student

    def build(cfg):
        model = real_build(cfg)
        model.register_forward_hook(lambda m, args, out: seen["student"].append(args[0].clone()))
        return model

    monkeypatch.setattr(train_mod, "build_student", build)
    aug = StudentAugConfig(color_prob=1.0, noise_prob=1.0)
    train_student(_student_cfg(tiny, tmp_path / "online", online_teacher=tiny["teacher"], ann=tiny["ann"],
                               images=tiny["images"], student_aug=aug))
    sampler = ViewSampler(AugmentConfig(), UDPHeatmap.for_input(INPUT_HW), COCO_17, 0)
    plain = ViewDataset(load_instances(tiny["ann"]), tiny["images"], sampler)
    clean = to_input_tensor(np.stack([plain[i]["crop"] for i in range(len(plain))]))
    key = lambda x: sorted(round(float(v), 3) for v in x.sum(dim=(1, 2, 3)))  # noqa: E731  order-free
    assert key(torch.cat(seen["teacher"])) == key(clean)
    assert key(torch.cat(seen["student"])) != key(clean)


def test_tensorboard_scalars_when_installed(tiny, tmp_path, monkeypatch):
    import sys
    import types

    from kdcache.train import train_student

    logged = []

    class Writer:
        def __init__(self, log_dir):
            logged.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            logged.append((tag, step))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            logged.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train_student(_student_cfg(tiny, tmp_path / "tb", caches=(tiny["cache"],)))
    assert logged[0] == ("dir", str(tmp_path / "tb/tensorboard")) and logged[-1] == ("closed", None)
    assert [s for tag, s in logged if tag == "train/loss"] == [1, 2]
    assert ("train/crops_per_s", 2) in logged


@pytest.mark.parametrize("backbone", NAMED_STUDENTS)
def test_every_named_student_trains_and_evaluates_from_a_cache(tiny, tmp_path, backbone):
    from kdcache.models import load_model
    from kdcache.evaluate import evaluate_model
    from kdcache.train import train_student

    run = train_student(_student_cfg(tiny, tmp_path / backbone, backbone, caches=(tiny["cache"],)))
    model = load_model(run / "last.pt")
    assert model.config.backbone == backbone
    metrics, results = evaluate_model(model, tiny["ann"], tiny["images"])  # PredictConfig: 0 workers
    assert len(results) == 6 and 0.0 <= metrics["AP"] <= 100.0  # one scored instance per person


def test_view_seed_gives_an_online_run_the_views_a_cache_holds(tiny, tmp_path, monkeypatch):
    """--view-seed S: the views come from (S, ann_id, view), as a dump with --seed S made them; init stays --seed."""
    from kdcache.cache import open_cache
    from kdcache.train import train_student

    seen = []
    real = sources_mod.ViewDataset

    def spy(*args, **kwargs):
        dataset = real(*args, **kwargs)
        seen.append(dataset)
        return dataset

    monkeypatch.setattr(sources_mod, "ViewDataset", spy)
    cfg = _student_cfg(tiny, tmp_path / "online", online_teacher=tiny["teacher"], ann=tiny["ann"],
                       images=tiny["images"], view_seed=0)
    train_student(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=7)))
    rows = open_cache(tiny["cache"])  # dumped with seed 0
    dataset = seen[0]
    dataset.set_epoch(1)  # epoch 1 draws view 2
    for index in range(len(dataset)):
        row = rows[index * 3 + 2]
        np.testing.assert_allclose(dataset[index]["affine"], row["affine"], atol=1e-9)
    assert dataset.sampler.seed == 0
