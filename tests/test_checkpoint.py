"""Checkpoint files: safe reading, state-dict unwrapping, atomic writes, and what a kdcache checkpoint records."""

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import kdcache.checkpoint as checkpoint_mod
from kdcache import __version__
from kdcache.checkpoint import (atomic_torch_save, checkpoint_dict, provenance, read_checkpoint, read_state_dict,
                                unwrap_state_dict, write_atomically)
from kdcache.errors import UserError
from kdcache.models import load_model
from kdcache.student import StudentConfig
from kdcache.vitpose import ViTPoseConfig, build_vitpose, vitpose_config

TENSORS = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.tensor([1, 2], dtype=torch.int64)}


def test_read_checkpoint_reads_plain_data_with_numpy_scalars(tmp_path):
    obj = {"state_dict": TENSORS, "meta": {"best": np.float64(0.75), "epoch": 3, "name": "x"}}
    torch.save(obj, tmp_path / "c.pth")
    got = read_checkpoint(tmp_path / "c.pth")
    assert got["meta"] == obj["meta"] and torch.equal(got["state_dict"]["a.weight"], TENSORS["a.weight"])


def test_read_checkpoint_refuses_code_and_foreign_files(tmp_path, code_payload):
    torch.save({"state_dict": TENSORS, "meta": code_payload}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"refused to load .*evil\.pth: it holds Python objects .*could run code"):
        read_checkpoint(tmp_path / "evil.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"notes\.pth is not a PyTorch checkpoint \(\w+ while reading it\)"):
        read_checkpoint(tmp_path / "notes.pth")
    with pytest.raises(UserError, match=r"checkpoint .*missing\.pth does not exist"):
        read_checkpoint(tmp_path / "missing.pth")


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "meta": {"epoch": 1}},
    lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {"module": sd},
    lambda sd: {"model": {"state_dict": sd}},
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
], ids=["bare", "state_dict", "model", "module", "model.state_dict", "module-prefix"])
def test_unwrap_state_dict_strips_wrappers_and_module_prefix(wrap):
    got = unwrap_state_dict(wrap(TENSORS), Path("c.pth"))
    assert list(got) == list(TENSORS) and all(torch.equal(got[k], TENSORS[k]) for k in TENSORS)


def test_unwrap_keeps_a_prefix_not_every_key_has():
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    assert list(unwrap_state_dict(sd, Path("c.pth"))) == ["module.a", "b"]


@pytest.mark.parametrize("obj, top", [({"epoch": 3, "lr": 0.1}, "['epoch', 'lr']"), ([1, 2], "list"), ({}, "[]")])
def test_unwrap_refuses_objects_without_tensors(obj, top):
    with pytest.raises(UserError, match=re.escape(f"c.pth holds no state dict of tensors (top level: {top})")):
        unwrap_state_dict(obj, Path("c.pth"))


def test_read_state_dict_reads_safetensors_and_torch_files_alike(tmp_path):
    save_file(TENSORS, tmp_path / "w.safetensors")
    torch.save({"state_dict": TENSORS}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        got = read_state_dict(tmp_path / name)
        assert sorted(got) == sorted(TENSORS) and all(torch.equal(got[k], TENSORS[k]) for k in TENSORS), name
    with pytest.raises(UserError, match="weights file .*gone.safetensors does not exist"):
        read_state_dict(tmp_path / "gone.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match=r"bad\.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_write_atomically_replaces_the_file_whole(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    write_atomically(path, b"new" * 1000)
    assert path.read_bytes() == b"new" * 1000 and os.listdir(tmp_path) == ["last.pt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[:10]))  # part of it lands in the temporary file first
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", full_disk)
        with pytest.raises(OSError) as info:
            write_atomically(path, b"new" * 1000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.pt"]


def test_atomic_torch_save_round_trips(tmp_path):
    atomic_torch_save({"state_dict": TENSORS, "step": 4}, tmp_path / "c.pt")
    got = read_checkpoint(tmp_path / "c.pt")
    assert got["step"] == 4 and torch.equal(got["state_dict"]["b.bias"], TENSORS["b.bias"])


def test_provenance_names_the_version_and_the_git_revision(monkeypatch):
    root = Path(checkpoint_mod.__file__).resolve().parent
    rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
    assert provenance() == {"kdcache_version": __version__, "git_rev": rev.stdout.strip() or "unknown"}

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(checkpoint_mod.subprocess, "run", no_git)
    assert provenance()["git_rev"] == "unknown"


class Wrapper(torch.nn.Module):  # as DistributedDataParallel holds the model
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_checkpoint_dict_records_the_model_and_round_trips_through_load_model(tmp_path):
    torch.manual_seed(0)
    model = build_vitpose(vitpose_config("vitpose-nano", input_hw=(64, 48))).eval()
    ckpt = checkpoint_dict(Wrapper(model), epoch=2, step=7)
    assert (ckpt["format"], ckpt["kind"], ckpt["epoch"], ckpt["step"]) == ("kdcache", "vitpose", 2, 7)
    assert ckpt["model_config"] == model.config.to_dict() and ckpt.items() >= provenance().items()
    assert list(ckpt["state_dict"]) == list(model.state_dict())  # no "module." prefix
    torch.save(ckpt, tmp_path / "t.pt")
    loaded = load_model(tmp_path / "t.pt")
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert loaded.config == model.config and torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("config", [vitpose_config("vitpose-nano", head="simple", input_hw=(64, 48)),
                                    StudentConfig("mobilenetv3_small_100", input_hw=(128, 96), head_channels=16)],
                         ids=["vitpose", "student"])
def test_model_config_round_trips_through_json_and_refuses_unknown_keys(config):
    d = json.loads(json.dumps(config.to_dict()))
    assert d["input_hw"] == list(config.input_hw)
    assert type(config).from_dict(d) == config  # input_hw back to a tuple
    with pytest.raises(UserError, match=rf"unknown {config.title} config keys \['wider', 'zeta'\] \(was it written "
                                        r"by a newer kdcache\?\)"):
        type(config).from_dict({**d, "zeta": 1, "wider": True})


def test_from_dict_fills_missing_fields_with_defaults():
    full = vitpose_config("vitpose-nano").to_dict()
    partial = {k: full[k] for k in ("arch", "embed_dim", "depth", "num_heads")}
    assert ViTPoseConfig.from_dict(partial) == ViTPoseConfig("vitpose-nano", 96, 4, 2)
