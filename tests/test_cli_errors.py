"""Everyday mistakes and a hostile environment, through `kdcache.cli.main`: one line on stderr, a non-zero
exit, no traceback, and no finished work lost."""

import errno
import json
import os

import pytest
import torch

import kdcache.checkpoint as checkpoint_mod
import kdcache.train as train_mod
from kdcache.cli import main

QUIET = ["--workers", "0", "--no-progress"]
TEACHER = ["--arch", "vitpose-nano", "--input-size", "128x96", "--batch-size", "4", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def data(synth_data):
    root = synth_data(8, 2, 3, max_people=1)
    return {"root": root, "train": ["--ann", str(root / "annotations/person_keypoints_train.json"),
                                    "--images", str(root / "train")]}


def _teacher(data, out, *extra):
    return main(["train-teacher", *data["train"], "--out", str(out), *TEACHER, *QUIET, *extra])


def test_an_existing_run_is_refused_unless_resume_or_overwrite(error_line, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _teacher(data, run, "--max-steps", "2") == 0
    before = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.csv", "config.json")}
    capsys.readouterr()
    assert _teacher(data, run, "--max-steps", "2") == 2
    err = error_line()
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing was touched

    assert _teacher(data, run, "--max-steps", "1", "--overwrite") == 0  # starts over: one step, not three
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 1
    assert _teacher(data, run, "--max-steps", "1", "--overwrite", "--resume") == 2  # one or the other

    capsys.readouterr()
    assert _teacher(data, tmp_path / "fresh", "--max-steps", "1", "--resume") == 0
    assert "WARNING kdcache.train: --resume: " in capsys.readouterr().err  # "... holds no last.pt yet; starting ..."


def test_resume_with_another_model_is_one_line(error_line, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _teacher(data, run, "--max-steps", "1") == 0
    capsys.readouterr()
    code = main(["train-teacher", *data["train"], "--out", str(run), "--arch", "vitpose-tiny", "--input-size",
                 "128x96", "--resume", *QUIET])
    err = error_line()
    assert code == 2 and "is another model" in err and "vitpose-nano" in err and "vitpose-tiny" in err


def test_resume_reads_a_checkpoint_written_before_a_config_field_existed(data, tmp_path, capsys):
    """A field added to a model's config since its last.pt was written takes its default: the run resumes."""
    run = tmp_path / "run"
    assert _teacher(data, run, "--max-steps", "1") == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["model_config"]["num_keypoints"], ckpt["model_config"]["layer_norm_eps"]  # as an older kdcache wrote
    torch.save(ckpt, run / "last.pt")
    capsys.readouterr()
    assert _teacher(data, run, "--max-steps", "1", "--resume") == 0
    assert f"resuming {run} after epoch 1 (step 1)" in capsys.readouterr().err


def test_out_that_is_a_file_or_cannot_be_written_fails_before_any_work(error_line, data, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(train_mod, "annotated_views", lambda *a: pytest.fail("work began before --out was checked"))
    assert _teacher(data, blocker) == 2
    assert "is a file, not a folder" in error_line()

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(kwargs.get("dir", "")))

    monkeypatch.setattr(train_mod.tempfile, "TemporaryFile", read_only)
    assert _teacher(data, tmp_path / "ro") == 1
    err = error_line()
    assert "Read-only file system" in err and str(tmp_path / "ro") in err and "choose another --out" in err


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--workers", "-1"), ("--epochs", "0"),
                                         ("--lr", "-1"), ("--max-steps", "-3"), ("--val-every", "0"),
                                         ("--ema", "1"), ("--rot-prob", "1.5")])
def test_impossible_numbers_are_refused_by_name(error_line, data, tmp_path, capsys, flag, value):
    assert main(["train-teacher", *data["train"], "--out", str(tmp_path / "x"), flag, value]) == 2
    err = error_line()
    assert f"argument {flag}: must be" in err and "--help" in err
    assert not (tmp_path / "x").exists()


def test_cuda_without_a_gpu_is_one_line(error_line, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _teacher(data, tmp_path / "x", "--device", "cuda") == 2
    err = error_line()
    assert "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err


def test_full_disk_at_a_checkpoint_keeps_the_last_good_epoch(error_line, data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_write = os.write

    def disk_fills_at_the_second_checkpoint(fd, payload):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("last.pt.tmp") and (run / "last.pt").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, payload)

    monkeypatch.setattr(checkpoint_mod.os, "write", disk_fills_at_the_second_checkpoint)
    assert _teacher(data, run, "--epochs", "2") == 1  # 8 instances, batch 4: 2 steps an epoch
    err = error_line()
    assert "No space left on device" in err and str(run / "last.pt") in err and "same command" in err
    assert not list(run.glob("*.tmp"))
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # the first epoch's checkpoint stands
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1"]  # no row for the epoch whose checkpoint never landed

    monkeypatch.setattr(checkpoint_mod.os, "write", real_write)  # space freed: the advice works
    assert _teacher(data, run, "--epochs", "2", "--resume") == 0
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


def test_a_failed_validation_never_loses_the_epoch(data, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("validation exploded")

    monkeypatch.setattr(train_mod, "_validate", broken)
    with pytest.raises(RuntimeError, match="validation exploded"):
        _teacher(data, run, "--epochs", "1")
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_best_holds_weights_only_and_config_records_absolute_paths(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data["root"])
    assert main(["train-teacher", "--ann", "annotations/person_keypoints_train.json", "--images", "train",
                 "--out", str(tmp_path / "run"), "--max-steps", "1", *TEACHER, *QUIET]) == 0
    best = torch.load(tmp_path / "run/best.pt", weights_only=True)
    last = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert "optimizer" not in best and "rng" not in best and "optimizer" in last
    assert best["state_dict"].keys() == last["state_dict"].keys()
    assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    config = json.loads((tmp_path / "run/config.json").read_text())["config"]
    assert config["ann"] == str(data["root"] / "annotations/person_keypoints_train.json")
    assert config["images"] == str(data["root"] / "train")


def test_view_augmentation_from_the_command_line_is_recorded(error_line, data, tmp_path, capsys):
    from kdcache.cache import open_cache
    from kdcache.cache_format import read_manifest

    run = tmp_path / "teacher"
    assert _teacher(data, run, "--max-steps", "1", "--rot-prob", "0", "--half-body-prob", "0",
                    "--scale-factor", "0.25") == 0
    aug = json.loads((run / "config.json").read_text())["config"]["aug"]
    assert (aug["rot_prob"], aug["half_body_prob"], aug["scale_factor"], aug["flip_prob"]) == (0, 0, 0.25, 0.5)

    cache = tmp_path / "cache"
    assert main(["dump-teacher", "--teacher", str(run / "last.pt"), *data["train"], "--out", str(cache),
                 "--views", "4", "--flip-prob", "0", "--batch-size", "8", *QUIET]) == 0
    assert read_manifest(cache)["dump"]["aug"]["flip_prob"] == 0
    rows = open_cache(cache)
    assert not any(rows[i]["flip"] for i in range(len(rows)))  # 24 augmented views, none mirrored

    capsys.readouterr()
    code = main(["train-student", "--cache", str(cache), "--student", "mobilenetv3_small_100", "--out",
                 str(tmp_path / "s"), "--rot-factor", "30", *QUIET])
    err = error_line()
    assert code == 2 and "--rot-factor" in err and "dump-teacher" in err


def test_an_error_in_a_loader_worker_is_still_one_line(error_line, data, tmp_path, capsys):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(data["root"] / "train", images)
    victim = sorted(images.iterdir())[3]
    victim.unlink()
    code = main(["train-student", "--ann", data["train"][1], "--images", str(images), "--student",
                 "mobilenetv3_small_100", "--input-size", "128x96", "--out", str(tmp_path / "s"), "--max-steps", "2",
                 "--batch-size", "4", "--head-channels", "16", "--workers", "1", "--no-progress"])
    err = error_line()
    assert code == 2 and victim.name in err and "Original Traceback" not in err


def test_out_of_memory_is_one_line(error_line, data, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "fit", oom)
    assert _teacher(data, tmp_path / "x") == 1
    err = error_line()
    assert "out of memory" in err and "--batch-size" in err


def test_logs_show_their_level_and_quiet_hides_info(data, tmp_path, capsys):
    assert _teacher(data, tmp_path / "a", "--max-steps", "1", "--resume") == 0
    err = capsys.readouterr().err
    assert " WARNING kdcache.train: --resume:" in err and " INFO kdcache.train: epoch 1/1" in err
    assert main(["-q", "train-teacher", *data["train"], "--out", str(tmp_path / "b"), "--max-steps", "1", *TEACHER,
                 "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "INFO" not in err and "epoch 1/" not in err  # and no progress bar: stderr is not a terminal


def test_training_logs_the_whole_runs_eta_and_draws_no_bar_into_a_pipe(data, tmp_path, capsys):
    assert main(["train-teacher", *data["train"], "--out", str(tmp_path / "a"), *TEACHER, "--epochs", "2",
                 "--workers", "0"]) == 0  # progress bars not switched off: stderr is captured, not a terminal
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "run ETA" in err and "epoch 2/2" in err and "done" in err
    assert "step/s" not in err and "\r" not in err


def test_every_flag_is_explained_with_its_default_and_every_command_has_an_example():
    from kdcache.cli_parser import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        assert f"example:\n  kdcache {name}" in text, name
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            if action.default is not None and action.option_strings:
                help_line = sub._get_formatter()._get_help_string(action)
                assert "(default:" in help_line, f"{name} {action.option_strings}"
