"""timm backbones: ImageNet attention tables learnt at 224 fitted to the crop's token grid (EfficientFormer
v1 and V2), and ImageNet weights found as timm finds them: its local cache first, else downloaded there."""

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from kdcache.errors import UserError
from kdcache.student import StudentConfig, build_student

INPUT_HW = (256, 192)


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
