"""ViTPose family loading: the architecture inferred from weights, release and kdcache files loaded into the
same function, code and foreign files refused, keys named, position embedding resized."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import UserError
from kdcache.teacher import load_teacher
from kdcache.vitpose import ARCHS, ViTPoseConfig, build_vitpose, vitpose_config
from kdcache.vitpose_family import config_from_state_dict, resize_pos_embed


def randomised(cfg: ViTPoseConfig, seed: int = 0) -> torch.nn.Module:
    """A model whose every tensor (BN statistics included) is random, so no term can hide."""
    model = build_vitpose(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
            elif ("norm" in name or "deconv_layers.1." in name or "deconv_layers.4." in name) \
                    and name.endswith("weight"):
                t.copy_(1.0 + 0.1 * noise)
            else:
                t.copy_(0.1 * noise)
    return model.eval()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("head", ["classic", "simple"])
def test_config_inferred_from_weights(arch, head):
    cfg = vitpose_config(arch, head=head)
    with torch.device("meta"):
        sd = build_vitpose(cfg).state_dict()
    assert config_from_state_dict(sd) == cfg
    assert config_from_state_dict(sd, input_hw=(128, 96)).input_hw == (128, 96)


@pytest.fixture(scope="module")
def tiny():
    model = randomised(vitpose_config("vitpose-tiny", input_hw=(128, 96)))
    x = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model, x, model(x)


def _loaded_output(path, x, **kw):
    model = load_teacher(path, **kw)
    assert not model.training
    with torch.no_grad():
        return model, model(x)


def test_official_release_dict_roundtrip(tiny, tmp_path):
    model, x, out = tiny
    # mmcv puts numpy scalars (the best score) into `meta`; those are plain data and must not be refused.
    meta = {"epoch": 210, "hook_msgs": {"best_score": np.float64(0.75)}, "config": "model = dict(...)"}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp_path / "vitpose.pth")
    loaded, got = _loaded_output(tmp_path / "vitpose.pth", x)
    assert loaded.config == model.config
    assert torch.equal(got, out)


def test_module_prefix_model_wrapper_and_bare_dict(tiny, tmp_path):
    model, x, out = tiny
    wrapped = {"model": {"module." + k: v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ddp.pth")
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    assert torch.equal(_loaded_output(tmp_path / "ddp.pth", x)[1], out)
    assert torch.equal(_loaded_output(tmp_path / "bare.pth", x)[1], out)


def test_kdcache_checkpoint_keeps_its_config(tmp_path):
    # 4 heads at width 192 cannot be inferred from weights: the stored config must win.
    cfg = dataclasses.replace(vitpose_config("vitpose-tiny", input_hw=(64, 48)), arch="mine", num_heads=4)
    model = randomised(cfg)
    x = torch.randn(1, 3, 64, 48)
    ckpt = {"format": "kdcache", "kind": "vitpose", "model_config": cfg.to_dict(),
            "state_dict": model.state_dict(), "kdcache_version": "0.1.0"}
    torch.save(ckpt, tmp_path / "teacher.pt")
    loaded, got = _loaded_output(tmp_path / "teacher.pt", x)
    assert loaded.config == cfg
    with torch.no_grad():
        assert torch.equal(got, model(x))
    torch.save({**ckpt, "kind": "student"}, tmp_path / "student.pt")
    with pytest.raises(UserError, match="student"):
        load_teacher(tmp_path / "student.pt")


def test_refuses_code_and_non_checkpoints(tiny, tmp_path, code_payload):
    torch.save({"state_dict": tiny[0].state_dict(), "meta": code_payload}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused"):
        load_teacher(tmp_path / "evil.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.pth is not a PyTorch checkpoint"):
        load_teacher(tmp_path / "notes.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(tmp_path / "missing.pth")
    with pytest.raises(UserError, match="folder"):
        load_teacher(tmp_path)


def test_missing_and_unexpected_keys_are_named(tiny, tmp_path):
    sd = dict(tiny[0].state_dict())
    del sd["backbone.last_norm.weight"]
    sd["backbone.mystery.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="backbone.last_norm.weight") as info:
        load_teacher(tmp_path / "bad.pth")
    assert "backbone.mystery.weight" in str(info.value)


def test_pos_embed_interpolated_to_new_input_size(tiny, tmp_path):
    model = tiny[0]  # trained grid 8x6 (128x96)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "t.pth")
    loaded, got = _loaded_output(tmp_path / "t.pth", torch.randn(1, 3, 256, 192), input_hw=(256, 192))
    assert got.shape == (1, 17, 64, 48)
    src, dst = model.backbone.pos_embed, loaded.backbone.pos_embed
    assert dst.shape == (1, 1 + 16 * 12, 192)
    assert torch.equal(dst[:, :1], src[:, :1])  # the class-token slot is kept as is
    grid = src[:, 1:].reshape(1, 8, 6, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 12), mode="bicubic", align_corners=False)
    assert torch.allclose(dst[:, 1:], want.permute(0, 2, 3, 1).reshape(1, -1, 192))
    assert torch.equal(resize_pos_embed(src, (8, 6), (8, 6)), src)
