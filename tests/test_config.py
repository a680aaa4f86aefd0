"""Stage configs: their JSON record, the checks they make, and that the command line's defaults are theirs."""

import dataclasses
import json
from pathlib import Path

import pytest

import kdcache.dump
import kdcache.evaluate
import kdcache.train
from kdcache.cli import main
from kdcache.config import (DumpConfig, EvalConfig, OptimConfig, RunConfig, TrainStudentConfig, TrainTeacherConfig,
                            to_jsonable)
from kdcache.errors import UserError
from kdcache.losses import KDConfig
from kdcache.predict import PredictConfig
from kdcache.student import StudentConfig


def test_to_jsonable_makes_paths_absolute_and_nested_configs_plain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainStudentConfig(student=StudentConfig("mobilenetv3_small_100", input_hw=(64, 48)),
                             run=RunConfig(out=Path("runs/a")), caches=(Path("cache"),), kd=KDConfig(alpha=0.25))
    record = to_jsonable(cfg)
    assert json.loads(json.dumps(record)) == record  # plain JSON values only
    assert record["run"]["out"] == str(tmp_path / "runs/a") and record["caches"] == [str(tmp_path / "cache")]
    assert record["student"]["input_hw"] == [64, 48] and record["kd"]["alpha"] == 0.25
    assert record["online_teacher"] is None and record["optim"] == dataclasses.asdict(OptimConfig())
    assert to_jsonable({1: (Path("x"), [2.5])}) == {"1": [str(tmp_path / "x"), [2.5]]}


def test_cache_and_online_teacher_together_are_refused():
    with pytest.raises(UserError, match="give one of --cache CACHE or --online-teacher CKPT, not both"):
        TrainStudentConfig(student=StudentConfig("mobilenetv3_small_100"), run=RunConfig(out=Path("o")),
                           caches=(Path("c"),), online_teacher=Path("t.pt"))


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        OptimConfig().lr = 1.0


# Each command with only its required flags, the stage function it calls, and the config those defaults mean.
# Progress bars are off because pytest's stderr is no terminal.
RUN = RunConfig(out=Path("out"), progress=False)
COMMANDS = {
    "dump-teacher": (["--teacher", "t.pt", "--ann", "a.json", "--images", "img", "--out", "out"],
                     (kdcache.dump, "dump_teacher"),
                     DumpConfig(teacher=Path("t.pt"), ann=Path("a.json"), images=Path("img"), run=RUN)),
    "train-teacher": (["--ann", "a.json", "--images", "img", "--out", "out"], (kdcache.train, "train_teacher"),
                      TrainTeacherConfig(ann=Path("a.json"), images=Path("img"), run=RUN)),
    "train-student": (["--student", "mobilenetv3_small_100", "--ann", "a.json", "--images", "img", "--out", "out"],
                      (kdcache.train, "train_student"),
                      TrainStudentConfig(student=StudentConfig("mobilenetv3_small_100"), run=RUN,
                                         ann=Path("a.json"), images=Path("img"))),
    # eval's loader workers default to the other commands' (RunConfig's), not PredictConfig's in-process 0.
    "eval": (["--model", "m.pt", "--ann", "a.json", "--images", "img", "--workers", "0"],
             (kdcache.evaluate, "evaluate"),
             EvalConfig(model=Path("m.pt"), ann=Path("a.json"), images=Path("img"), predict=PredictConfig())),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_line_defaults_are_the_config_defaults(command, monkeypatch, capsys):
    flags, (module, name), want = COMMANDS[command]
    seen = []

    def stage(cfg, **kwargs):
        seen.append(cfg)
        raise UserError("stopped after the config was built")

    monkeypatch.setattr(module, name, stage)
    assert main([command, *flags]) == 2
    assert "stopped after the config was built" in capsys.readouterr().err
    assert seen == [want]


def test_dump_flags_show_the_dump_config_defaults():
    from kdcache.cli_parser import build_parser, default

    a = build_parser().parse_args(["dump-teacher", "--teacher", "t", "--ann", "a", "--images", "i", "--out", "o"])
    given = {"views": a.views, "batch_size": a.batch_size, "shard_size": a.shard_size,
             "crop_format": f"{a.crop}{a.jpeg_quality}", "heatmap_storage": a.heatmap_encoding,
             "heatmap_rel_error": a.heatmap_error, "gzip_level": a.gzip_level, "teacher_flip": a.teacher_flip,
             "skip_bad_images": a.skip_bad_images, "expert": a.expert}
    assert given == {name: default(DumpConfig, name) for name in given}
    assert (a.device, a.workers, a.seed) == (default(RunConfig, "device"), default(RunConfig, "workers"),
                                       default(RunConfig, "seed"))
