"""Students: every named backbone builds, runs at 256x192 and trains; weights load only from local files."""

import json

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

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


def test_efficientformerv2_224_weights_fit_256x192(tmp_path):
    """Relative-position attention biases learnt on a 7x7 grid are cropped/edge-padded to the 8x6 grid."""
    imagenet = timm.create_model("efficientformerv2_s0")
    with torch.no_grad():
        for name, p in imagenet.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn_like(p))
    torch.save(imagenet.state_dict(), tmp_path / "in1k.pth")
    student = build_student(StudentConfig("efficientformerv2_s0", pretrained=str(tmp_path / "in1k.pth")))
    old = imagenet.stages[3].blocks[2].token_mixer.attention_biases.detach()
    new = student.backbone.stages_3.blocks[2].token_mixer.attention_biases.detach()
    heads = old.shape[0]
    old, new = old.reshape(heads, 7, 7), new.reshape(heads, 8, 6)
    assert torch.equal(new[:, :7, :], old[:, :7, :6])  # same (|dy|, |dx|) -> same learnt bias
    assert torch.equal(new[:, 7, :], old[:, 6, :6])  # |dy| = 7 never seen at 224: repeats |dy| = 6
    with torch.no_grad():
        assert student.eval()(torch.randn(1, 3, *INPUT_HW)).shape == (1, 17, 64, 48)


@pytest.mark.parametrize("input_hw", [(256, 192), (128, 96), (64, 64)])
def test_efficientformer_v1_224_weights_fit_other_grids(tmp_path, input_hw):
    """v1's last-stage attention (7x7 at 224) is rebuilt for the stride-32 grid: every (query, key) token
    pair gets the bias learnt for its (|dy|, |dx|) offset, offsets past 6 repeat 6; other weights load as is."""
    imagenet = timm.create_model("efficientformer_l1")
    with torch.no_grad():
        imagenet.stages[3].blocks[4].token_mixer.attention_biases.copy_(torch.randn(8, 49))
    torch.save(imagenet.state_dict(), tmp_path / "in1k.pth")
    student = build_student(StudentConfig("efficientformer_l1", input_hw=input_hw,
                                          pretrained=str(tmp_path / "in1k.pth"))).eval()
    old, new = imagenet.stages[3].blocks[4].token_mixer, student.backbone.model.stages[3].blocks[4].token_mixer
    h, w = input_hw[0] // 32, input_hw[1] // 32
    assert new.attention_biases.shape == (8, h * w) and new.attention_bias_idxs.shape == (h * w, h * w)
    assert torch.equal(new.qkv.weight, old.qkv.weight)
    table = old.attention_biases.detach().reshape(8, 7, 7)
    gathered = new.attention_biases[:, new.attention_bias_idxs].detach()  # [heads, N, N] as in forward
    for q in range(h * w):
        for k in range(h * w):
            dy, dx = abs(q // w - k // w), abs(q % w - k % w)
            assert torch.equal(gathered[:, q, k], table[:, min(dy, 6), min(dx, 6)]), (q, k)
    x = torch.randn(1, 3, *input_hw)
    with torch.no_grad():
        out = student(x)
    assert out.shape == (1, 17, input_hw[0] // 4, input_hw[1] // 4) and torch.isfinite(out).all()

    # A trained student's checkpoint holds the fitted shapes: it loads strictly into a rebuilt student.
    rebuilt = build_student(student.config, load_pretrained=False)
    rebuilt.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), out)


def test_pretrained_timm_reads_the_local_cache_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    # The HF cache layout hf_hub_download(local_files_only=True) resolves: refs/main -> snapshots/<rev>/file.
    repo = tmp_path / "hf" / "models--timm--mobilenetv3_small_100.lamb_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    imagenet = timm.create_model("mobilenetv3_small_100")
    save_file(imagenet.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    real = huggingface_hub.hf_hub_download

    def local_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "downloaded although the weights were cached"
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", local_only)
    student = build_student(StudentConfig("mobilenetv3_small_100", pretrained="timm"))
    assert torch.equal(student.backbone.conv_stem.weight, imagenet.conv_stem.weight)


def test_pretrained_timm_downloads_into_timms_cache_when_missing(tmp_path, monkeypatch):
    """As timm.create_model(pretrained=True): a missing file is fetched from the hub (faked here: no network)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    imagenet = timm.create_model("mobilenetv3_small_100")
    calls = []

    def fake_hub(repo_id, filename, revision=None, local_files_only=False, **kwargs):
        calls.append((repo_id, filename, local_files_only))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        path = tmp_path / "downloaded" / filename
        path.parent.mkdir(exist_ok=True)
        save_file(imagenet.state_dict(), str(path))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub)
    student = build_student(StudentConfig("mobilenetv3_small_100", pretrained="timm"))
    assert torch.equal(student.backbone.conv_stem.weight, imagenet.conv_stem.weight)
    assert ("timm/mobilenetv3_small_100.lamb_in1k", "model.safetensors", False) in calls

    def offline(repo_id, filename, revision=None, local_files_only=False, **kwargs):
        raise (huggingface_hub.errors.LocalEntryNotFoundError("not cached") if local_files_only
               else ConnectionError("no route to host"))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match=r"could not download ImageNet weights .*ConnectionError.*--pretrained FILE"):
        build_student(StudentConfig("mobilenetv3_small_100", pretrained="timm"))


def test_rebuild_from_checkpoint_skips_pretrained():
    """A trained student's config may name weights this machine lacks; its checkpoint replaces them anyway."""
    cfg = StudentConfig("mobilenetv3_small_100", pretrained="/nowhere/in1k.pth", head_channels=16)
    with pytest.raises(UserError, match="not found"):
        build_student(cfg)
    assert build_student(cfg, load_pretrained=False).config == cfg
