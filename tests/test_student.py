"""Students: every named backbone builds, runs at 256x192 and trains; weights load only from local files."""

import json

import pytest
import timm
import torch

from kdcache.errors import UserError
from kdcache.student import NAMED_STUDENTS, StudentConfig, build_student

INPUT_HW = (256, 192)
BACKBONES = NAMED_STUDENTS


def _train_step_reduces_loss(model: torch.nn.Module, input_hw: tuple[int, int]) -> None:
    """One SGD step on a fixed batch: finite loss, parameters move, and the same batch's loss goes down."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *input_hw)
    target = torch.rand(2, 17, input_hw[0] // 4, input_hw[1] // 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    loss0 = torch.nn.functional.mse_loss(model(x), target)
    assert torch.isfinite(loss0)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    with torch.no_grad():
        loss1 = torch.nn.functional.mse_loss(model(x), target)
    assert loss1 < loss0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_shape_and_train_step(backbone):
    torch.manual_seed(0)
    model = build_student(StudentConfig(backbone, head_channels=32))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *INPUT_HW))
    assert out.shape == (2, 17, 64, 48)
    assert torch.isfinite(out).all()
    # Training at 64x64 (stride-32 map 2x2) keeps the suite fast; the layers are the same.
    _train_step_reduces_loss(build_student(StudentConfig(backbone, input_hw=(64, 64), head_channels=16)), (64, 64))


@pytest.mark.parametrize("head", ["deconv", "light"])
def test_heads_reach_stride_4_at_other_sizes(head):
    model = build_student(StudentConfig("mobilenetv3_small_100", head=head, input_hw=(128, 96), num_keypoints=5,
                                        head_channels=16)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 96)).shape == (1, 5, 32, 24)
    assert model.config.head == head


def test_config_round_trip_through_json():
    cfg = StudentConfig("mobilenetv3_small_100", head="light", input_hw=(128, 96), head_channels=64)
    again = StudentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.input_hw, tuple)
    with pytest.raises(UserError, match="unknown student config keys"):
        StudentConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_bad_configs_raise_user_errors():
    with pytest.raises(UserError, match="did you mean mobilenetv3_large_100"):
        build_student(StudentConfig("mobilenetv3_larg_100"))
    with pytest.raises(UserError, match="unknown timm backbone"):
        build_student(StudentConfig("no_such_net"))
    with pytest.raises(UserError, match="head"):
        build_student(StudentConfig("mobilenetv3_small_100", head="fpn"))
    with pytest.raises(UserError, match="not divisible"):
        build_student(StudentConfig("mobilenetv3_small_100", input_hw=(250, 192)))
    with pytest.raises(UserError, match="ends at stride 7") as stride_7:  # patch 7 convolutions, no pyramid
        build_student(StudentConfig("convmixer_768_32"))
    with pytest.raises(UserError, match=r"\(1, 2048, 6, 4\) feature map") as unpadded:  # valid convs lose pixels
        build_student(StudentConfig("inception_v3"))
    assert "\n" not in str(stride_7.value) + str(unpadded.value)


def test_pretrained_from_files(tmp_path):
    """An ImageNet classifier state dict (timm layout) and a kdcache student checkpoint both load."""
    imagenet = timm.create_model("mobilenetv3_small_100")  # the layout of timm's released weights
    torch.save(imagenet.state_dict(), tmp_path / "in1k.pth")
    student = build_student(StudentConfig("mobilenetv3_small_100", pretrained=str(tmp_path / "in1k.pth")))
    reference = imagenet.state_dict()  # MobileNetV3Features keeps timm's parameter names
    for k, v in student.backbone.state_dict().items():
        assert torch.equal(v, reference[k]), k

    torch.save({"format": "kdcache", "state_dict": student.state_dict()}, tmp_path / "student.pt")
    again = build_student(StudentConfig("mobilenetv3_small_100", pretrained=str(tmp_path / "student.pt")))
    for (k, a), b in zip(student.backbone.state_dict().items(), again.backbone.state_dict().values()):
        assert torch.equal(a, b), k

    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(UserError, match="do not fit"):
        build_student(StudentConfig("mobilenetv3_small_100", pretrained=str(tmp_path / "junk.pth")))
    with pytest.raises(UserError, match="not found"):
        build_student(StudentConfig("mobilenetv3_small_100", pretrained=str(tmp_path / "missing.pth")))


def test_rebuild_from_checkpoint_skips_pretrained():
    """A trained student's config may name weights this machine lacks; its checkpoint replaces them anyway."""
    cfg = StudentConfig("mobilenetv3_small_100", pretrained="/nowhere/in1k.pth", head_channels=16)
    with pytest.raises(UserError, match="not found"):
        build_student(cfg)
    assert build_student(cfg, load_pretrained=False).config == cfg
