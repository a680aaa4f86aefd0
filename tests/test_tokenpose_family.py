"""Loading TokenPose files: the official code's three file layouts, the architecture read from the shapes, kdcache
checkpoints, and one-line refusals."""


import pytest
import torch

from kdcache.checkpoint import checkpoint_dict
from kdcache.errors import UserError
from kdcache.teacher import ARCHS as TEACHER_ARCHS
from kdcache.teacher import build_teacher, load_teacher
from kdcache.tokenpose import ARCHS, TokenPose, build_tokenpose, tokenpose_config
from kdcache.tokenpose_family import config_from_state_dict

NANO_HW = (128, 96)


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    model = build_tokenpose(tokenpose_config("tokenpose-nano", NANO_HW)).eval()
    x = torch.randn(2, 3, *NANO_HW, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "tokenpose-nano"])
@pytest.mark.parametrize("input_hw", [(256, 192), (384, 288)])
def test_architecture_read_from_the_shapes(arch, input_hw):
    cfg = tokenpose_config(arch, input_hw)
    with torch.device("meta"):
        sd = TokenPose(cfg).state_dict()
    assert config_from_state_dict(sd) == cfg


def test_384x288_l_d24_reads_its_6x4_patches():
    """The official 384x288 L/D24 config: PATCH_SIZE [4, 6] (w, h) on a 96x72 map, heatmap 96x72."""
    import dataclasses
    cfg = dataclasses.replace(tokenpose_config("tokenpose-l", (384, 288)), patch_hw=(6, 4))
    with torch.device("meta"):
        sd = TokenPose(cfg).state_dict()
    assert tuple(sd["transformer.pos_embedding"].shape) == (1, 16 * 18, 192)
    assert config_from_state_dict(sd) == dataclasses.replace(cfg, arch="tokenpose-custom")


@pytest.mark.parametrize("layout", ["final_state", "checkpoint", "model_best"])
def test_official_file_layouts(nano, tmp_path, layout):
    """tools/train.py writes final_state.pth and model_best.pth (bare state dicts of the unwrapped model) and
    checkpoint.pth ({'epoch', 'model': name, 'state_dict': DataParallel's, 'perf', 'optimizer'})."""
    model, x, want = nano
    sd = model.state_dict()
    obj = {"epoch": 300, "model": "pose_tokenpose_t", "perf": 0.7, "optimizer": {"state": {}, "param_groups": []},
           "state_dict": {"module." + k: v for k, v in sd.items()}} if layout == "checkpoint" else sd
    torch.save(obj, tmp_path / f"{layout}.pth")
    loaded = load_teacher(tmp_path / f"{layout}.pth")
    assert loaded.kind == "tokenpose" and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_kdcache_checkpoint_round_trip(nano, tmp_path):
    model, x, want = nano
    torch.save(checkpoint_dict(model, epoch=1, step=2), tmp_path / "last.pt")
    loaded = load_teacher(tmp_path / "last.pt")
    assert loaded.config == model.config and loaded.config.patch_hw == (4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    assert loaded.codec.name == "tokenpose-heatmap" and loaded.codec.input_hw == NANO_HW


def test_refusals_say_what_to_do(nano, tmp_path):
    model, _, _ = nano
    torch.save(model.state_dict(), tmp_path / "t.pth")
    with pytest.raises(UserError, match=r"t.pth: TokenPose runs only at the size it was trained at, 128x96 .* "
                                        r"not 256x192"):
        load_teacher(tmp_path / "t.pth", input_hw=(256, 192))
    with pytest.raises(UserError, match=r"--expert 'coco': .*t.pth is a TokenPose file, without ViTPose\+\+ experts"):
        load_teacher(tmp_path / "t.pth", expert="coco")
    broken = {k: v for k, v in model.state_dict().items() if "layers.1.0.fn.fn.to_qkv" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"missing keys features.transformer.layers.1.0.fn.fn.to_qkv.weight \(1\)"):
        load_teacher(tmp_path / "broken.pth")
    with pytest.raises(UserError, match="TokenPose has one head"):
        build_teacher("tokenpose-t", "simple", (256, 192))


def test_train_teacher_presets():
    assert {"tokenpose-t", "tokenpose-s", "tokenpose-b", "tokenpose-l", "tokenpose-nano"} <= set(TEACHER_ARCHS)
    model = build_teacher("tokenpose-nano", "classic", NANO_HW)
    assert model.config.input_hw == NANO_HW and model.config.heatmap_hw == (32, 24)
    assert model(torch.zeros(1, 3, *NANO_HW)).shape == (1, 17, 32, 24)
