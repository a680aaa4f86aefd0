"""ViTPose teacher: official key names and shapes, exactness against a functional reference, loading."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import UserError
from kdcache.teacher import load_teacher, teacher_from_checkpoint
from kdcache.vitpose import ARCHS, ViTPose, ViTPoseConfig, build_vitpose, vitpose_config
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


def random_state_dict(cfg: ViTPoseConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-named weights for `cfg`, all random (BN statistics included), matrices scaled 1/sqrt(fan_in)."""
    with torch.device("meta"):
        shapes = ViTPose(cfg).state_dict()
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in shapes.items():
        if not t.is_floating_point():
            sd[name] = torch.zeros(t.shape, dtype=t.dtype)
            continue
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith("running_var"):
            sd[name] = 0.5 + noise.abs()
        elif t.ndim == 1 and ("norm" in name or "deconv_layers.1." in name or "deconv_layers.4." in name) \
                and name.endswith("weight"):
            sd[name] = 1.0 + 0.1 * noise
        elif t.ndim >= 2 and name != "backbone.pos_embed":
            fan_in = t[0].numel() if "deconv" not in name else t.shape[0]
            sd[name] = noise / fan_in ** 0.5
        else:
            sd[name] = 0.1 * noise
    return sd


def reference_backbone(sd: dict, num_heads: int, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ViTPose's ViT (mmpose/models/backbones/vit.py) as functional ops on the raw weights: x -> [N, D, Hp, Wp]."""
    w = sd["backbone.patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd["backbone.patch_embed.proj.bias"], stride=w.shape[-1], padding=2)
    n, d, hp, wp = t.shape
    t = t.flatten(2).transpose(1, 2)
    t = t + sd["backbone.pos_embed"][:, 1:] + sd["backbone.pos_embed"][:, :1]
    hd = d // num_heads
    depth = len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")})
    for i in range(depth):
        p = f"backbone.blocks.{i}."
        y = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=eps)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, -1, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(n, -1, d)
        t = t + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=eps)
        y = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        t = t + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    t = F.layer_norm(t, (d,), sd["backbone.last_norm.weight"], sd["backbone.last_norm.bias"], eps=eps)
    return t.permute(0, 2, 1).reshape(n, d, hp, wp)


def reference_head(sd: dict, head: str, f: torch.Tensor) -> torch.Tensor:
    """TopdownHeatmapSimpleHead: classic (2x deconv-BN-ReLU, 1x1 conv) or simple (ReLU, bilinear x4, 3x3 conv)."""
    if head == "classic":
        for j in (0, 3):
            f = F.conv_transpose2d(f, sd[f"keypoint_head.deconv_layers.{j}.weight"], stride=2, padding=1)
            bn = f"keypoint_head.deconv_layers.{j + 1}."
            f = F.relu(F.batch_norm(f, sd[bn + "running_mean"], sd[bn + "running_var"], sd[bn + "weight"],
                                    sd[bn + "bias"], training=False, eps=1e-5))
        return F.conv2d(f, sd["keypoint_head.final_layer.weight"], sd["keypoint_head.final_layer.bias"])
    f = F.interpolate(F.relu(f), scale_factor=4, mode="bilinear", align_corners=False)
    return F.conv2d(f, sd["keypoint_head.final_layer.weight"], sd["keypoint_head.final_layer.bias"], padding=1)


def reference_forward(sd: dict, num_heads: int, head: str, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return reference_head(sd, head, reference_backbone(sd, num_heads, x, eps))


@pytest.mark.parametrize("head", ["classic", "simple"])
@pytest.mark.parametrize("input_hw", [(256, 192), (128, 96)])
@pytest.mark.parametrize("arch", ["vitpose-tiny", "vitpose-nano"])
def test_output_shape(arch, head, input_hw):
    model = build_vitpose(vitpose_config(arch, head=head, input_hw=input_hw)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *input_hw))
    assert out.shape == (2, 17, input_hw[0] // 4, input_hw[1] // 4)
    assert model.config.heatmap_hw == tuple(out.shape[-2:])
    assert torch.isfinite(out).all()


def test_vitpose_s_official_key_names_and_shapes():
    with torch.device("meta"):
        model = build_vitpose(vitpose_config("vitpose-s"))
        simple = build_vitpose(vitpose_config("vitpose-s", head="simple")).state_dict()
    sd = model.state_dict()
    # Too small for the exactness test to see, so checked directly: official LayerNorm eps, conv geometry.
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    proj = model.backbone.patch_embed.proj
    assert (proj.kernel_size, proj.stride, proj.padding) == ((16, 16), (16, 16), (2, 2))
    expected = {
        "backbone.patch_embed.proj.weight": (384, 3, 16, 16),
        "backbone.pos_embed": (1, 193, 384),  # 16x12 grid + the class-token slot
        "backbone.blocks.11.attn.qkv.weight": (1152, 384),
        "backbone.blocks.11.attn.qkv.bias": (1152,),
        "backbone.blocks.0.mlp.fc1.weight": (1536, 384),
        "backbone.last_norm.weight": (384,),
        "keypoint_head.deconv_layers.0.weight": (384, 256, 4, 4),
        "keypoint_head.deconv_layers.1.running_var": (256,),
        "keypoint_head.deconv_layers.3.weight": (256, 256, 4, 4),
        "keypoint_head.deconv_layers.4.num_batches_tracked": (),
        "keypoint_head.final_layer.weight": (17, 256, 1, 1),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    block = {k.split(".", 3)[3] for k in sd if k.startswith("backbone.blocks.0.")}
    assert block == {f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                     for p in ("weight", "bias")}  # no layer scale, no drop-path or other extra keys
    assert len(sd) == 3 + 12 * 12 + 2 + 14  # patch embed + pos, blocks, last norm, 2x(deconv + BN) + conv
    assert tuple(simple["keypoint_head.final_layer.weight"].shape) == (17, 384, 3, 3)
    assert not any("deconv" in k for k in simple)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("head", ["classic", "simple"])
def test_config_inferred_from_weights(arch, head):
    cfg = vitpose_config(arch, head=head)
    with torch.device("meta"):
        sd = build_vitpose(cfg).state_dict()
    assert config_from_state_dict(sd) == cfg
    assert config_from_state_dict(sd, input_hw=(128, 96)).input_hw == (128, 96)


def test_official_sizes_and_depth_reduced_inference():
    sizes = {a: (c.embed_dim, c.depth, c.num_heads) for a, c in ARCHS.items() if a[-1] in "sblh"}
    assert sizes == {"vitpose-s": (384, 12, 12), "vitpose-b": (768, 12, 12), "vitpose-l": (1024, 24, 16),
                     "vitpose-h": (1280, 32, 16)}
    small = ViTPoseConfig("vitpose-custom", 384, 2, 12, input_hw=(128, 96), head="simple", num_keypoints=5)
    with torch.device("meta"):
        sd = build_vitpose(small).state_dict()
    assert config_from_state_dict(sd) == small
    assert vitpose_config("vitpose-s").grid_hw == (16, 12)


def test_config_dict_roundtrip_and_unknown_arch():
    cfg = vitpose_config("vitpose-b", head="simple", input_hw=(384, 288))
    assert ViTPoseConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="vitpose-b"):
        vitpose_config("vitpose-xl")


# Heads per size as the official configs state them (ViTPose_{small,base}_coco_256x192.py), not our presets.
OFFICIAL_HEADS = {"vitpose-s": 12, "vitpose-b": 12}


@pytest.mark.parametrize("arch", ["vitpose-s", "vitpose-b"])
def test_loaded_release_matches_functional_reference(arch):
    """Random weights in the release layout, loaded by the real path, against the official formulas:
    classic and simple head on one backbone (so the reference backbone runs once)."""
    classic = random_state_dict(vitpose_config(arch), seed=3)
    dim = classic["backbone.pos_embed"].shape[-1]
    gen = torch.Generator().manual_seed(4)
    simple = {k: v for k, v in classic.items() if not k.startswith("keypoint_head.")}
    simple["keypoint_head.final_layer.weight"] = torch.randn(17, dim, 3, 3, generator=gen) / (9 * dim) ** 0.5
    simple["keypoint_head.final_layer.bias"] = 0.1 * torch.randn(17, generator=gen)
    x = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = reference_backbone(classic, OFFICIAL_HEADS[arch], x)
    for head, sd in (("classic", classic), ("simple", simple)):
        model = teacher_from_checkpoint({"state_dict": sd, "meta": {}}, Path(f"{arch}-{head}.pth"))
        assert (model.config.arch, model.config.head) == (arch, head)
        with torch.no_grad():
            out, ref = model(x), reference_head(sd, head, features)
        assert out.shape == ref.shape == (1, 17, 64, 48)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), head
        assert ref.abs().max() > 0.1  # not a comparison of two near-zero maps


def test_drop_path_only_in_training():
    cfg = dataclasses.replace(vitpose_config("vitpose-nano", input_hw=(64, 48)), drop_path_rate=0.5)
    model = build_vitpose(cfg)
    x = torch.randn(4, 3, 64, 48)
    torch.manual_seed(0)
    assert not torch.equal(model.train()(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


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


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_refuses_code_and_non_checkpoints(tiny, tmp_path):
    torch.save({"state_dict": tiny[0].state_dict(), "meta": Payload()}, tmp_path / "evil.pth")
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


@pytest.mark.parametrize("input_hw", [(384, 288), (128, 96)])
def test_other_input_sizes_follow_the_official_resize(input_hw):
    """A 256x192 release run at another size: pos_embed resized as the official get_abs_pos, stride 4 heatmaps."""
    sd = random_state_dict(vitpose_config("vitpose-tiny", head="simple"), seed=4)
    model = teacher_from_checkpoint({"state_dict": sd}, Path("t.pth"), input_hw=input_hw)
    h, w = input_hw[0] // 16, input_hw[1] // 16
    grid = sd["backbone.pos_embed"][:, 1:].reshape(1, 16, 12, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    resized = {**sd, "backbone.pos_embed": torch.cat([sd["backbone.pos_embed"][:, :1], grid.reshape(1, h * w, -1)], 1)}
    x = torch.randn(1, 3, *input_hw, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, ref = model(x), reference_forward(resized, 3, "simple", x)
    assert out.shape == (1, 17, input_hw[0] // 4, input_hw[1] // 4) and model.config.heatmap_hw == out.shape[-2:]
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
