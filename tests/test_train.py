"""Trainer: the schedule, and resume after a crash reaching the same weights as an uninterrupted run."""

import dataclasses

import pytest
import torch

import kdcache.train as train_mod
from kdcache.config import OptimConfig, RunConfig, TrainTeacherConfig
from kdcache.synth import SynthConfig, synthesize
from kdcache.train import lr_factor, train_teacher


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 100, 10) == pytest.approx(1e-3)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_drops_tenfold_twice():
    assert [lr_factor(s, 210, 5, "step") for s in (100, 169, 170, 199, 200, 209)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, ema):
    data = synthesize(SynthConfig(out=tmp_path / "data", train_images=4, val_images=0, seed=2))
    cfg = TrainTeacherConfig(ann=data / "annotations/person_keypoints_train.json", images=data / "train",
                             run=RunConfig(out=tmp_path / "a", workers=0, progress=False), arch="vitpose-nano",
                             input_hw=(64, 64), optim=OptimConfig(epochs=3, batch_size=2, lr=1e-3, warmup_steps=2,
                                                                  ema=ema))
    train_teacher(cfg)
    steps_per_epoch = torch.load(tmp_path / "a/last.pt", weights_only=True)["step"] // 3

    calls = {"n": 0}
    real_loss = train_mod.heatmap_mse

    def crashing_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 1:  # first step of the third epoch
            raise RuntimeError("simulated crash")
        return real_loss(*args, **kwargs)

    crashed = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=tmp_path / "b"))
    monkeypatch.setattr(train_mod, "heatmap_mse", crashing_loss)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_teacher(crashed)
    assert torch.load(tmp_path / "b/last.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(train_mod, "heatmap_mse", real_loss)
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
