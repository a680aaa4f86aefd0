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


def random_official(head: str = "classic", seed: int = 0, num_keypoints: int = 17,
                    input_hw: tuple[int, int] = INPUT_HW) -> dict[str, torch.Tensor]:
    cfg = vitpose_config("vitpose-tiny", head=head, input_hw=input_hw)
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


def vitpose_plus_file(input_hw: tuple[int, int] = INPUT_HW) -> dict[str, torch.Tensor]:
    """The layout of vitpose+_*.pth: ViTMoE blocks (fc2 shared + 6 experts), COCO head + 5 associate heads."""
    sd = random_official(seed=5, input_hw=input_hw)
    gen = torch.Generator().manual_seed(6)
    for i in range(DEPTH):
        sd[f"backbone.blocks.{i}.mlp.fc2.weight"] = sd[f"backbone.blocks.{i}.mlp.fc2.weight"][:DIM - PART]
        sd[f"backbone.blocks.{i}.mlp.fc2.bias"] = sd[f"backbone.blocks.{i}.mlp.fc2.bias"][:DIM - PART]
        for e in range(6):
            sd[f"backbone.blocks.{i}.mlp.experts.{e}.weight"] = 0.2 * torch.randn(PART, HIDDEN, generator=gen)
            sd[f"backbone.blocks.{i}.mlp.experts.{e}.bias"] = 0.2 * torch.randn(PART, generator=gen)
    for j, k in enumerate(PLUS_KEYPOINTS[1:]):
        head = random_official(seed=10 + j, num_keypoints=k, input_hw=input_hw)
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


# ------------------------------------------------------------------------------------------- mmpose 1.x

# mmpose 1.x's td-hm_ViTPose-{small,base}_8xb64-210e_coco-256x192.py: (embed_dims, num_layers, num_heads).
MMPOSE1_ARCHS = {"vitpose-s": (384, 12, 12), "vitpose-b": (768, 12, 12)}


def random_mmpose1(dim: int, depth: int, head: str, grid=(16, 12), cls_token: bool = True, seed: int = 0,
                   extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Random weights in mmpose 1.x's layout, key for key: mmcls/mmpretrain VisionTransformer (patch_embed.projection,
    layers.{i}.{ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0, ffn.layers.1}, ln1) and HeatmapHead (head.*)."""
    gen = torch.Generator().manual_seed(seed)
    w = lambda *shape, fan_in=None: torch.randn(shape, generator=gen) / (fan_in or shape[-1]) ** 0.5  # noqa: E731
    b = lambda n: 0.1 * torch.randn(n, generator=gen)  # noqa: E731
    ln = lambda n: 1 + 0.1 * torch.randn(n, generator=gen)  # noqa: E731
    sd = {"backbone.patch_embed.projection.weight": w(dim, 3, 16, 16, fan_in=768),
          "backbone.patch_embed.projection.bias": b(dim),
          "backbone.pos_embed": 0.1 * torch.randn(1, grid[0] * grid[1] + cls_token, dim, generator=gen)}
    if cls_token:  # mmcls 1.x builds it even with with_cls_token=False
        sd["backbone.cls_token"] = 0.1 * torch.randn(1, 1, dim, generator=gen)
    for i in range(depth):
        p = f"backbone.layers.{i}."
        sd.update({p + "ln1.weight": ln(dim), p + "ln1.bias": b(dim),
                   p + "attn.qkv.weight": w(3 * dim, dim), p + "attn.qkv.bias": b(3 * dim),
                   p + "attn.proj.weight": w(dim, dim), p + "attn.proj.bias": b(dim),
                   p + "ln2.weight": ln(dim), p + "ln2.bias": b(dim),
                   p + "ffn.layers.0.0.weight": w(4 * dim, dim), p + "ffn.layers.0.0.bias": b(4 * dim),
                   p + "ffn.layers.1.weight": w(dim, 4 * dim), p + "ffn.layers.1.bias": b(dim)})
    sd.update({"backbone.ln1.weight": ln(dim), "backbone.ln1.bias": b(dim)})
    if head == "classic":  # deconv_out_channels (256, 256), kernels 4: deconv (no bias), BN, ReLU, twice
        c_in = dim
        for j in (0, 3):
            bn = f"head.deconv_layers.{j + 1}."
            sd.update({f"head.deconv_layers.{j}.weight": w(c_in, 256, 4, 4, fan_in=c_in), bn + "weight": ln(256),
                       bn + "bias": b(256), bn + "running_mean": b(256),
                       bn + "running_var": 0.5 + torch.rand(256, generator=gen),
                       bn + "num_batches_tracked": torch.tensor(1000)})
            c_in = 256
        sd.update({"head.final_layer.weight": w(17, 256, 1, 1, fan_in=256), "head.final_layer.bias": b(17)})
    else:  # deconv_out_channels [], final_layer kernel 3 padding 1
        sd.update({"head.final_layer.weight": w(17, dim, 3, 3, fan_in=9 * dim), "head.final_layer.bias": b(17)})
    return {**sd, **(extra or {})}


def reference_mmpose1(sd: dict, num_heads: int, head: str, x: torch.Tensor) -> torch.Tensor:
    """mmpose 1.x's TopdownPoseEstimator as functional ops on its own key names: x [N, 3, H, W] -> [N, 17, H/4, W/4].

    Backbone (mmcls 1.x / mmpretrain VisionTransformer, with_cls_token=False, out_type featmap): PatchEmbed conv with
    padding 2; mmcls concatenates the class token, adds all of pos_embed, then drops the class token, so the patches
    get pos_embed[:, 1:]; mmpretrain (no cls_token in the file) adds its patch-only pos_embed. Pre-norm layers
    x + attn(ln1(x)), x + ffn(ln2(x)) with LayerNorm eps 1e-6, GELU FFN; final norm ln1; tokens back to a map.
    Neck (simple only): FeatureMapProcessor(scale_factor=4, apply_relu=True): ReLU, then bilinear, align_corners False.
    Head: HeatmapHead, deconvs 4x4 / stride 2 / padding 1 with BN (eps 1e-5) and ReLU, then final_layer.
    """
    import torch.nn.functional as F

    w = sd["backbone.patch_embed.projection.weight"]
    t = F.conv2d(x, w, sd["backbone.patch_embed.projection.bias"], stride=16, padding=2)
    n, d, hp, wp = t.shape
    t = t.flatten(2).transpose(1, 2)
    if "backbone.cls_token" in sd:
        t = (torch.cat([sd["backbone.cls_token"].expand(n, -1, -1), t], dim=1) + sd["backbone.pos_embed"])[:, 1:]
    else:
        t = t + sd["backbone.pos_embed"]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone.layers."))
    for i in range(depth):
        p = f"backbone.layers.{i}."
        y = F.layer_norm(t, (d,), sd[p + "ln1.weight"], sd[p + "ln1.bias"], eps=1e-6)
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
            n, -1, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, d)
        t = t + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(t, (d,), sd[p + "ln2.weight"], sd[p + "ln2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"])),
                     sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])
        t = t + y
    f = F.layer_norm(t, (d,), sd["backbone.ln1.weight"], sd["backbone.ln1.bias"], eps=1e-6)
    f = f.transpose(1, 2).reshape(n, d, hp, wp)
    if head == "simple":
        f = F.interpolate(F.relu(f), scale_factor=4.0, mode="bilinear", align_corners=False)
        return F.conv2d(f, sd["head.final_layer.weight"], sd["head.final_layer.bias"], padding=1)
    for j in (0, 3):
        bn = f"head.deconv_layers.{j + 1}."
        f = F.conv_transpose2d(f, sd[f"head.deconv_layers.{j}.weight"], stride=2, padding=1, output_padding=0)
        f = F.relu(F.batch_norm(f, sd[bn + "running_mean"], sd[bn + "running_var"], sd[bn + "weight"],
                                sd[bn + "bias"], training=False, eps=1e-5))
    return F.conv2d(f, sd["head.final_layer.weight"], sd["head.final_layer.bias"])


@pytest.mark.parametrize("arch", ["vitpose-s", "vitpose-b"])
def test_mmpose1_files_match_their_functional_reference(arch, tmp_path):
    """mmpose 1.x model-zoo layout (mmcls 1.x era: cls_token in the file), classic and simple, through load_teacher."""
    dim, depth, heads = MMPOSE1_ARCHS[arch]
    x = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(1))
    for head in ("classic", "simple"):
        sd = random_mmpose1(dim, depth, head, seed=3)
        torch.save({"meta": {"mmpose_version": "1.0.0"}, "state_dict": sd}, tmp_path / f"{head}.pth")
        model = load_teacher(tmp_path / f"{head}.pth")
        assert (model.config.arch, model.config.head, model.config.input_hw) == (arch, head, (256, 192))
        with torch.no_grad():
            out, ref = model(x), reference_mmpose1(sd, heads, head, x)
        assert out.shape == ref.shape == (1, 17, 64, 48)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), head
        assert ref.abs().max() > 0.1  # not a comparison of two near-zero maps


def test_mmpose1_position_slot_is_not_the_official_one(tmp_path):
    """The class slot of pos_embed: official ViTPose adds it to every patch, mmpose 1.x never does. Both eras of
    mmpose 1.x files (mmcls: slot + cls_token; mmpretrain: patch positions only) give mmpose's function."""
    mmcls = random_mmpose1(DIM, 2, "simple", grid=(4, 3), seed=5)
    mmpretrain = {k: v for k, v in mmcls.items() if k != "backbone.cls_token"}
    mmpretrain["backbone.pos_embed"] = mmcls["backbone.pos_embed"][:, 1:]
    x = torch.randn(2, 3, *INPUT_HW, generator=torch.Generator().manual_seed(2))
    ref = reference_mmpose1(mmcls, HEADS, "simple", x)
    for name, sd in (("mmcls", mmcls), ("mmpretrain", mmpretrain)):
        torch.save({"state_dict": sd}, tmp_path / f"{name}.pth")
        with torch.no_grad():
            out = load_teacher(tmp_path / f"{name}.pth")(x)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), name
    # Read as if it were the official layout (the slot added to the patches), the function differs visibly.
    official_like = {**mmcls, "backbone.cls_token": torch.zeros(1, 1, DIM)}
    official_like["backbone.pos_embed"] = mmcls["backbone.pos_embed"] + mmcls["backbone.pos_embed"][:, :1]
    assert (reference_mmpose1(official_like, HEADS, "simple", x) - ref).abs().max() > 1e-2 * ref.abs().max()


def test_mmpose1_unknown_keys_are_refused(tmp_path):
    extra = {"head.conv_layers.0.weight": torch.zeros(256, 256, 3, 3)}  # a HeatmapHead with conv layers
    torch.save({"state_dict": random_mmpose1(DIM, 2, "classic", grid=(4, 3), extra=extra)}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"odd.pth: mmpose 1.x keys that ViTPose does not have: "
                                        r"head.conv_layers.0.weight \(1\)"):
        load_teacher(tmp_path / "odd.pth")


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
    assert "--expert 'aic' of " in (err := capsys.readouterr().err) and "predicts AIC's keypoints, the annotation " \
        "file has COCO's" in err
    # AP-10K's expert has 17 joints too, but animal ones: refused on COCO people, taken on an AP-10K file.
    assert main(["dump-teacher", "--teacher", str(tmp_path / "plus.pth"), "--expert", "ap10k",
                 "--out", str(tmp_path / "ap10k"), *common]) == 2
    assert "predicts AP-10K's keypoints, the annotation file has COCO's" in capsys.readouterr().err
    from kdcache.keypoints import keypoint_set
    ann = json.loads((data / "annotations/person_keypoints_train.json").read_text())
    ann["categories"][0]["keypoints"] = list(keypoint_set("ap10k-17").names)
    (data / "annotations/ap10k.json").write_text(json.dumps(ann))
    common[1] = str(data / "annotations/ap10k.json")
    assert main(["dump-teacher", "--teacher", str(tmp_path / "plus.pth"), "--expert", "ap10k",
                 "--out", str(tmp_path / "ap10k"), *common]) == 0
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


def test_wholebody_expert_dumped_distilled_and_scored_per_part(tmp_path, capsys):
    """ViTPose++'s whole-body expert on a COCO-WholeBody-layout file: the cache holds its 133 maps, a student
    distils them, and `eval` scores it the COCO-WholeBody way (whole body, then each part), writes its results
    in COCO-WholeBody's layout, and scoring that file again gives the same numbers."""
    from kdcache.cache import open_cache
    from kdcache.cli import main
    from kdcache.synth import SynthConfig, synthesize

    data = synthesize(SynthConfig(out=tmp_path / "data", train_images=4, val_images=2, seed=2, max_people=2,
                                  keypoint_set="coco-wholebody-133"))
    torch.save({"state_dict": vitpose_plus_file(input_hw=(64, 64)), "meta": {}}, tmp_path / "vitpose+_tiny.pth")
    train = ["--ann", str(data / "annotations/person_keypoints_train.json"), "--images", str(data / "train")]
    val = ["--ann", str(data / "annotations/person_keypoints_val.json"), "--images", str(data / "val")]
    quiet = ["--workers", "0", "--no-progress"]
    assert main(["dump-teacher", "--teacher", str(tmp_path / "vitpose+_tiny.pth"), "--expert", "wholebody",
                 "--views", "2", "--out", str(tmp_path / "cache"), *train, *quiet]) == 0
    cache = open_cache(tmp_path / "cache", images=data / "train")
    assert cache.keypoint_set.name == "coco-wholebody-133" and cache[0]["heatmaps"].shape == (133, 16, 16)
    assert cache[0]["keypoints"].shape == (133, 3) and (cache[0]["keypoints"][91:, 2] > 0).any()  # hands labelled
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "cache")]) == 0
    assert "keypoint_set       coco-wholebody-133 (133 keypoints)" in capsys.readouterr().out

    assert main(["train-student", "--cache", str(tmp_path / "cache"), "--student", "mobilenetv3_small_050",
                 "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "student"), *quiet]) == 0
    saved = torch.load(tmp_path / "student/last.pt", weights_only=True)
    assert saved["model_config"]["keypoint_set"] == "coco-wholebody-133"
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "student/last.pt"), *val, "--results-out",
                 str(tmp_path / "r.json"), "--metrics-out", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "whole-body (all 133 keypoints):"
    assert [line.split()[0] for line in table[-5:]] == ["body", "foot", "face", "left_hand", "right_hand"]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {f"{part} {name}" for part in ("body", "foot", "face", "left_hand", "right_hand")
            for name in ("AP", "AR")} <= set(metrics)
    results = json.loads((tmp_path / "r.json").read_text())
    assert [len(results[0][k]) for k in ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts",
                                         "righthand_kpts")] == [51, 18, 204, 63, 63]
    assert main(["eval", "--results", str(tmp_path / "r.json"), "--ann", val[1],
                 "--metrics-out", str(tmp_path / "m2.json")]) == 0
    assert json.loads((tmp_path / "m2.json").read_text()) == metrics
    # The teacher itself, scored with its expert the same way.
    assert main(["eval", "--model", str(tmp_path / "vitpose+_tiny.pth"), "--expert", "wholebody", *val,
                 "--metrics-out", str(tmp_path / "t.json")]) == 0
    assert "face AP" in json.loads((tmp_path / "t.json").read_text())
