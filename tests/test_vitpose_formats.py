"""Every released ViTPose file layout, built synthetically key for key, loads into the same function.

Layouts as the sources write them: ViTAE-Transformer/ViTPose (release files, `vit_moe.py` + `tools/model_split.py`
for ViTPose++) and huggingface/transformers (`convert_vitpose_to_hf.py`, `modeling_vitpose{,_backbone}.py`).
The name mappings below are written out here, independently of the loader.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from kdcache.checkpoint import checkpoint_dict
from kdcache.models import load_model
from kdcache.errors import UserError
from kdcache.teacher import load_teacher
from kdcache.vitpose import ViTPose, vitpose_config
from kdcache.vitpose_formats import VITPOSE_PLUS_DATASETS

INPUT_HW = (64, 48)
DIM, DEPTH, HEADS, HIDDEN, DECONV = 192, 6, 3, 768, 128  # vitpose-tiny
PART = 48  # ViTPose++ part_features (the official files use 96-320; any split works)
PLUS_KEYPOINTS = (17, 14, 16, 17, 17, 133)  # coco, then the associate heads: aic, mpii, ap10k, apt36k, wholebody


def random_official(head: str = "classic", seed: int = 0, num_keypoints: int = 17) -> dict[str, torch.Tensor]:
    cfg = vitpose_config("vitpose-tiny", head=head, input_hw=INPUT_HW)
    with torch.device("meta"):
        shapes = ViTPose(cfg).state_dict()
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, t in shapes.items():
        shape = (num_keypoints, *t.shape[1:]) if "final_layer" in k else t.shape
        if not t.is_floating_point():
            sd[k] = torch.zeros(shape, dtype=t.dtype)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=gen)
        else:
            sd[k] = 0.2 * torch.randn(shape, generator=gen)
    return sd


def run(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, 3, *model.config.input_hw, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    """A classic-head release file's weights and the output of the model loaded from it."""
    sd = random_official("classic")
    path = tmp_path_factory.mktemp("official") / "classic.pth"
    torch.save({"state_dict": sd}, path)
    return sd, run(load_teacher(path))


# ------------------------------------------------------------------------------------------- official files


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "meta": {"epoch": 210}},
    lambda sd: {"model": sd},
    lambda sd: {"module": sd},
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    lambda sd: sd,
], ids=["state_dict", "model", "module", "module-prefix", "bare"])
def test_official_wrappers(classic, tmp_path, wrap):
    sd, want = classic
    torch.save(wrap(sd), tmp_path / "v.pth")
    assert torch.equal(run(load_teacher(tmp_path / "v.pth")), want)


def test_multi_dataset_file_extras_ignored(classic, tmp_path, caplog):
    sd, want = classic
    extra = {"backbone.cls_token": torch.zeros(1, 1, DIM)}
    for i, k in enumerate((14, 16)):  # COCO+AIC+MPII: associate heads for AIC and MPII
        extra.update({f"associate_keypoint_heads.{i}." + n[len("keypoint_head."):]: v
                      for n, v in random_official(num_keypoints=k).items() if n.startswith("keypoint_head.")})
    torch.save({"state_dict": {**sd, **extra}}, tmp_path / "multi.pth")
    with caplog.at_level("INFO"):
        got = run(load_teacher(tmp_path / "multi.pth"))
    assert torch.equal(got, want)
    assert "ignoring 29 multi-dataset keys" in caplog.text


# ------------------------------------------------------------------------------------------- ViTPose++


def vitpose_plus_file() -> dict[str, torch.Tensor]:
    """The layout of vitpose+_*.pth: ViTMoE blocks (fc2 shared + 6 experts), COCO head + 5 associate heads."""
    sd = random_official(seed=5)
    gen = torch.Generator().manual_seed(6)
    for i in range(DEPTH):
        sd[f"backbone.blocks.{i}.mlp.fc2.weight"] = sd[f"backbone.blocks.{i}.mlp.fc2.weight"][:DIM - PART]
        sd[f"backbone.blocks.{i}.mlp.fc2.bias"] = sd[f"backbone.blocks.{i}.mlp.fc2.bias"][:DIM - PART]
        for e in range(6):
            sd[f"backbone.blocks.{i}.mlp.experts.{e}.weight"] = 0.2 * torch.randn(PART, HIDDEN, generator=gen)
            sd[f"backbone.blocks.{i}.mlp.experts.{e}.bias"] = 0.2 * torch.randn(PART, generator=gen)
    for j, k in enumerate(PLUS_KEYPOINTS[1:]):
        head = random_official(seed=10 + j, num_keypoints=k)
        sd.update({f"associate_keypoint_heads.{j}." + n[len("keypoint_head."):]: v
                   for n, v in head.items() if n.startswith("keypoint_head.")})
    return sd


def split_like_model_split(sd: dict, expert: int) -> dict[str, torch.Tensor]:
    """What tools/model_split.py writes for one dataset: fc2 = [fc2; experts.k], head = associate head k-1."""
    out = {k: v for k, v in sd.items() if not k.startswith("associate_keypoint_heads.") and ".experts." not in k}
    for i in range(DEPTH):
        for kind in ("weight", "bias"):
            out[f"backbone.blocks.{i}.mlp.fc2.{kind}"] = torch.cat(
                [sd[f"backbone.blocks.{i}.mlp.fc2.{kind}"], sd[f"backbone.blocks.{i}.mlp.experts.{expert}.{kind}"]])
    if expert > 0:
        out = {k: v for k, v in out.items() if not k.startswith("keypoint_head.")}
        prefix = f"associate_keypoint_heads.{expert - 1}."
        out.update({"keypoint_head." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return out


def moe_reference_block_mlp(sd: dict, i: int, y: torch.Tensor, expert: int) -> torch.Tensor:
    """vit_moe.MoEMlp for a batch from one dataset: cat(shared fc2, experts[expert]) after fc1 + GELU."""
    h = torch.nn.functional.gelu(torch.nn.functional.linear(y, sd[f"backbone.blocks.{i}.mlp.fc1.weight"],
                                                             sd[f"backbone.blocks.{i}.mlp.fc1.bias"]))
    shared = torch.nn.functional.linear(h, sd[f"backbone.blocks.{i}.mlp.fc2.weight"],
                                        sd[f"backbone.blocks.{i}.mlp.fc2.bias"])
    part = torch.nn.functional.linear(h, sd[f"backbone.blocks.{i}.mlp.experts.{expert}.weight"],
                                      sd[f"backbone.blocks.{i}.mlp.experts.{expert}.bias"])
    return torch.cat([shared, part], dim=-1)


@pytest.fixture(scope="module")
def plus():
    return vitpose_plus_file()


@pytest.mark.parametrize("expert", [None, "coco", 0, "aic", "wholebody", "3"])
def test_vitpose_plus_expert_merged_as_model_split(plus, tmp_path, expert):
    torch.save({"state_dict": plus, "meta": {}}, tmp_path / "vitpose+_tiny.pth")
    index = {None: 0, "3": 3}.get(expert, expert)
    index = VITPOSE_PLUS_DATASETS.index(index) if isinstance(index, str) else index
    model = load_teacher(tmp_path / "vitpose+_tiny.pth", expert=expert)
    assert model.config.num_keypoints == PLUS_KEYPOINTS[index]
    torch.save({"state_dict": split_like_model_split(plus, index)}, tmp_path / "split.pth")
    assert torch.equal(run(model), run(load_teacher(tmp_path / "split.pth")))
    # The merged MLP is the MoE MLP of vit_moe.py (shared part, then the expert's part).
    y = torch.randn(2, 5, DIM)
    with torch.no_grad():
        got = model.backbone.blocks[2].mlp(y)
    assert torch.allclose(got, moe_reference_block_mlp(plus, 2, y, index), atol=1e-5)


def test_vitpose_plus_split_file_and_bad_experts(plus, tmp_path):
    # model_split.py's coco.pth keeps the unused experts and associate heads next to the merged fc2.
    split = {**split_like_model_split(plus, 0), **{k: v for k, v in plus.items() if ".experts." in k}}
    torch.save({"state_dict": split}, tmp_path / "coco.pth")
    torch.save({"state_dict": split_like_model_split(plus, 0)}, tmp_path / "clean.pth")
    assert torch.equal(run(load_teacher(tmp_path / "coco.pth")), run(load_teacher(tmp_path / "clean.pth")))
    # It is one dataset's model: asking it for the AIC expert used to give COCO's, with a warning.
    with pytest.raises(UserError,
                       match="--expert 'aic': .*coco.pth is a ViTPose\\+\\+ file already split .*drop --expert"):
        load_teacher(tmp_path / "coco.pth", expert="aic")
    torch.save({"state_dict": plus}, tmp_path / "plus.pth")
    with pytest.raises(UserError, match="unknown ViTPose\\+\\+ expert 'crowdpose'"):
        load_teacher(tmp_path / "plus.pth", expert="crowdpose")
    with pytest.raises(UserError, match="has 6 experts"):
        load_teacher(tmp_path / "plus.pth", expert=6)


# ------------------------------------------------------------------------------------------- HuggingFace


def to_hf(sd: dict) -> dict[str, torch.Tensor]:
    """Official -> transformers VitPoseForPoseEstimation names (convert_vitpose_to_hf.py's mapping)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("associate_keypoint_heads.") or k == "backbone.cls_token":
            continue  # the converter drops them
        if ".attn.qkv." in k:
            i, kind = k.split(".")[2], k.split(".")[-1]
            for name, chunk in zip(("query", "key", "value"), v.chunk(3)):
                out[f"backbone.encoder.layer.{i}.attention.attention.{name}.{kind}"] = chunk
            continue
        for old, new in [("backbone.patch_embed.proj", "backbone.embeddings.patch_embeddings.projection"),
                         ("backbone.pos_embed", "backbone.embeddings.position_embeddings"),
                         ("backbone.blocks.", "backbone.encoder.layer."), ("attn.proj", "attention.output.dense"),
                         ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                         ("backbone.last_norm", "backbone.layernorm"),
                         ("keypoint_head.deconv_layers.0", "head.deconv1"),
                         ("keypoint_head.deconv_layers.1", "head.batchnorm1"),
                         ("keypoint_head.deconv_layers.3", "head.deconv2"),
                         ("keypoint_head.deconv_layers.4", "head.batchnorm2"),
                         ("keypoint_head.final_layer", "head.conv")]:
            k = k.replace(old, new)
        out[k] = v
    return out


def hf_config(simple: bool, eps: float | None = 1e-6, **backbone) -> dict:
    """config.json as save_pretrained writes it: values equal to the class defaults are left out."""
    bb = {"model_type": "vitpose_backbone", "hidden_size": DIM, "num_hidden_layers": DEPTH,
          "num_attention_heads": HEADS, "image_size": list(INPUT_HW), "out_indices": [DEPTH], **backbone}
    if eps is not None:
        bb["layer_norm_eps"] = eps
    cfg = {"model_type": "vitpose", "architectures": ["VitPoseForPoseEstimation"], "backbone_config": bb,
           "id2label": {str(i): f"k{i}" for i in range(17)}}
    if not simple:
        cfg["use_simple_decoder"] = False
    return cfg


def write_hf(folder, sd: dict, config: dict | None, as_bin: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if as_bin:
        torch.save(to_hf(sd), folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in to_hf(sd).items()}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("head", ["classic", "simple"])
def test_huggingface_folder_safetensors(tmp_path, head):
    sd = random_official(head, seed=7)
    torch.save({"state_dict": sd}, tmp_path / "official.pth")
    folder = write_hf(tmp_path / f"vitpose-{head}", sd, hf_config(head == "simple"))
    model = load_teacher(folder)
    assert model.config.head == head and model.config.input_hw == INPUT_HW
    assert torch.equal(run(model), run(load_teacher(tmp_path / "official.pth")))
    assert torch.equal(run(load_teacher(folder / "model.safetensors")), run(model))
    assert torch.equal(run(load_model(folder / "model.safetensors")), run(model))  # what eval/bench/export use


def test_huggingface_bin_through_load_model_and_sharded_index(classic, tmp_path):
    sd, want = classic
    folder = write_hf(tmp_path / "bin", sd, hf_config(False), as_bin=True)
    assert torch.equal(run(load_model(folder / "pytorch_model.bin")), want)  # config.json found next to it
    assert torch.equal(run(load_model(folder)), want)
    hf = {k: v.contiguous() for k, v in to_hf(sd).items()}
    keys = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": keys[:20], "model-00002-of-00002.safetensors": keys[20:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name, part in shards.items():
        save_file({k: hf[k] for k in part}, sharded / name)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, part in shards.items() for k in part}}))
    (sharded / "config.json").write_text(json.dumps(hf_config(False)))
    assert torch.equal(run(load_teacher(sharded)), want)


def eps_of(model: torch.nn.Module) -> set[float]:
    return {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}


def test_huggingface_layer_norm_eps_honoured(tmp_path):
    sd = random_official("simple", seed=8)
    torch.save({"state_dict": sd}, tmp_path / "official.pth")
    official = load_teacher(tmp_path / "official.pth")
    default = load_teacher(write_hf(tmp_path / "default", sd, hf_config(True, eps=None)))
    large = load_teacher(write_hf(tmp_path / "large", sd, hf_config(True, eps=0.5)))
    assert eps_of(official) == {1e-6} and eps_of(default) == {1e-12} and eps_of(large) == {0.5}
    for module in official.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 0.5
    assert torch.equal(run(large), run(official))
    assert not torch.allclose(run(large), run(default), atol=1e-3)


def test_huggingface_vitpose_plus(plus, tmp_path):
    # The converter keeps the experts (selected by dataset_index) and drops the associate heads.
    config = hf_config(False, num_experts=6, part_features=PART)
    folder = write_hf(tmp_path / "plus", plus, config)
    torch.save({"state_dict": split_like_model_split(plus, 0)}, tmp_path / "coco.pth")
    assert torch.equal(run(load_teacher(folder)), run(load_teacher(tmp_path / "coco.pth")))
    assert load_teacher(folder, expert="mpii").config.num_keypoints == 17  # no MPII head in an HF file


def test_expert_is_refused_for_a_file_without_experts(classic, tmp_path):
    """--expert on a plain ViTPose file used to be ignored (a warning in the log): the user got the COCO model."""
    sd, _ = classic
    torch.save({"state_dict": sd}, tmp_path / "plain.pth")
    for expert in ("aic", "coco", 0):
        with pytest.raises(UserError, match=f"--expert {expert!r}: .*plain.pth is a plain ViTPose file, without "
                                            "ViTPose\\+\\+ experts; drop --expert"):
            load_teacher(tmp_path / "plain.pth", expert=expert)
    folder = write_hf(tmp_path / "hf", sd, hf_config(False))
    with pytest.raises(UserError, match="is a plain ViTPose file"):
        load_teacher(folder, expert="mpii")
    model = load_teacher(tmp_path / "plain.pth")
    torch.save(checkpoint_dict(model, epoch=0, step=0), tmp_path / "kd.pt")
    with pytest.raises(UserError, match="--expert 'coco': .*kd.pt is a kdcache checkpoint of one ViTPose model"):
        load_teacher(tmp_path / "kd.pt", expert="coco")
    assert torch.equal(run(load_teacher(tmp_path / "kd.pt")), run(model))


def test_huggingface_weights_without_config_json_are_refused(classic, tmp_path):
    """Heads and LayerNorm eps are not in the weights: the old guess (1e-12, heads by width) built another
    function. A folder and a lone weight file are the same case; official names in a safetensors file are not."""
    sd, want = classic
    folder = write_hf(tmp_path / "bare", sd, None)
    for path in (folder, folder / "model.safetensors"):
        with pytest.raises(UserError, match=f"{path} holds HuggingFace VitPose weights but {folder / 'config.json'} "
                                            "is missing: .*put the model's config.json beside them"):
            load_teacher(path)
    (folder / "config.json").write_text(json.dumps(hf_config(False)))  # the advice, followed
    assert torch.equal(run(load_teacher(folder)), want)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "official.safetensors")
    assert torch.equal(run(load_teacher(tmp_path / "official.safetensors")), want)


def test_huggingface_errors_name_the_problem(classic, tmp_path):
    sd, _ = classic
    folder = write_hf(tmp_path / "wrong", sd, {**hf_config(False), "use_simple_decoder": True})
    with pytest.raises(UserError, match="use_simple_decoder=True but the weights hold a classic head"):
        load_teacher(folder)
    (folder / "config.json").write_text(json.dumps(hf_config(False)))
    odd = {**to_hf(sd), "backbone.encoder.layer.0.mystery.weight": torch.zeros(2)}
    save_file({k: v.contiguous() for k, v in odd.items()}, folder / "model.safetensors")
    with pytest.raises(UserError, match="backbone.encoder.layer.0.mystery.weight"):
        load_teacher(folder / "model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder without ViTPose weights"):
        load_teacher(tmp_path / "empty")


def test_huggingface_bin_that_runs_code_is_refused(classic, tmp_path, code_payload):
    folder = write_hf(tmp_path / "evil", classic[0], hf_config(False), as_bin=True)
    torch.save({**to_hf(classic[0]), "x": code_payload}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused"):
        load_teacher(folder)


# ------------------------------------------------------------------------------------------- commands


def test_dump_teacher_uses_the_chosen_expert_and_hashes_hf_weights(plus, tmp_path, capsys):
    """`dump-teacher --expert ap10k` caches that expert's heatmaps and records it; an expert whose joints are
    not COCO's is refused; an HF folder is hashed by its weight file, so two folders never look alike."""
    import numpy as np

    from kdcache.cache import open_cache
    from kdcache.cache_format import read_manifest, sha256_file
    from kdcache.cli import main
    from kdcache.synth import SynthConfig, synthesize
    from kdcache.inference import to_input_tensor

    data = synthesize(SynthConfig(out=tmp_path / "data", train_images=2, val_images=0, seed=1, max_people=1))
    torch.save({"state_dict": plus}, tmp_path / "plus.pth")
    common = ["--ann", str(data / "annotations/person_keypoints_train.json"), "--images", str(data / "train"),
              "--views", "2", "--workers", "0", "--no-progress", "--crop", "none",
              "--heatmap-error", "0.008"]  # fine storage: 1% then tells the chosen expert from the others
    assert main(["dump-teacher", "--teacher", str(tmp_path / "plus.pth"), "--expert", "aic",
                 "--out", str(tmp_path / "aic"), *common]) == 2
    assert "predicts 14 keypoints, not COCO's 17" in capsys.readouterr().err
    assert main(["dump-teacher", "--teacher", str(tmp_path / "plus.pth"), "--expert", "ap10k",
                 "--out", str(tmp_path / "ap10k"), *common]) == 0  # AP-10K: 17 (animal) joints
    cache = open_cache(tmp_path / "ap10k", images=data / "train")
    assert read_manifest(tmp_path / "ap10k")["teacher"]["expert"] == "ap10k"
    row = cache[1]
    x = to_input_tensor(row["crop"][None])
    with torch.no_grad():
        chosen = load_teacher(tmp_path / "plus.pth", expert="ap10k")(x)[0].numpy()
        coco = load_teacher(tmp_path / "plus.pth")(x)[0].numpy()
    assert np.linalg.norm(row["heatmaps"] - chosen) / np.linalg.norm(chosen) < 0.01
    assert np.linalg.norm(row["heatmaps"] - coco) / np.linalg.norm(coco) > 0.05

    folder = write_hf(tmp_path / "hf", random_official(seed=9), hf_config(False))
    assert main(["dump-teacher", "--teacher", str(folder), "--out", str(tmp_path / "hf-cache"), *common]) == 0
    assert read_manifest(tmp_path / "hf-cache")["teacher"]["sha256"] == sha256_file(folder / "model.safetensors")
