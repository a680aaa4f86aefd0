"""TokenPose model: the official key names and shapes, and exactness against a functional reference written here
from the architecture (leeyegy/TokenPose lib/models/{tokenpose_base,hr_base,pose_tokenpose_*}.py), for every
variant, on random weights in the official layout loaded through the real loader."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdcache.teacher import teacher_from_checkpoint
from kdcache.tokenpose import ARCHS, TokenPose, build_tokenpose, sine_position_embedding, tokenpose_config

# experiments/coco/tokenpose/*.yaml: attention heads of each variant.
OFFICIAL_HEADS = {"tokenpose-t": 16, "tokenpose-s": 8, "tokenpose-s-v2": 8, "tokenpose-b": 8, "tokenpose-l": 12}


def random_state_dict(model: TokenPose, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every entry (BN statistics included); the sine encoding kept as the file stores it."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            sd[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif name.endswith("pos_embedding"):
            sd[name] = t.clone()
        elif name.endswith("running_var"):
            sd[name] = 0.5 + torch.rand(t.shape, generator=gen)
        elif t.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scales
            sd[name] = 1 + 0.1 * torch.randn(t.shape, generator=gen)
        elif t.ndim >= 2 and not name.endswith("keypoint_token"):
            sd[name] = torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5
        else:
            sd[name] = 0.1 * torch.randn(t.shape, generator=gen)
    return sd


# ------------------------------------------------------------------ the reference, from the description alone


def bn(sd, p, x):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, eps=1e-5)


def conv_bn(sd, p, x, stride=1, relu=True):
    """`p` is a Sequential(conv, BN[, ReLU]): p0 conv (padding k//2, no bias), p1 BN."""
    w = sd[p + "0.weight"]
    x = bn(sd, p + "1.", F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2))
    return F.relu(x) if relu else x


def bottleneck(sd, p, x):
    out = F.relu(bn(sd, p + "bn1.", F.conv2d(x, sd[p + "conv1.weight"])))
    out = F.relu(bn(sd, p + "bn2.", F.conv2d(out, sd[p + "conv2.weight"], padding=1)))
    out = bn(sd, p + "bn3.", F.conv2d(out, sd[p + "conv3.weight"]))
    identity = bn(sd, p + "downsample.1.", F.conv2d(x, sd[p + "downsample.0.weight"])) \
        if p + "downsample.0.weight" in sd else x
    return F.relu(out + identity)


def resnet_stem(sd, p, x):
    """conv1/bn1, conv2/bn2 (3x3 stride 2, ReLU), then layer1's 4 Bottlenecks."""
    x = F.relu(bn(sd, p + "bn1.", F.conv2d(x, sd[p + "conv1.weight"], stride=2, padding=1)))
    x = F.relu(bn(sd, p + "bn2.", F.conv2d(x, sd[p + "conv2.weight"], stride=2, padding=1)))
    for i in range(4):
        x = bottleneck(sd, f"{p}layer1.{i}.", x)
    return x


def hr_module(sd, p, xs, outputs):
    """HighResolutionModule: 4 BasicBlocks per branch, then output i = relu(sum_j fuse_ij(x_j))."""
    for b in range(len(xs)):
        for k in range(4):
            q = f"{p}branches.{b}.{k}."
            y = F.relu(bn(sd, q + "bn1.", F.conv2d(xs[b], sd[q + "conv1.weight"], padding=1)))
            xs[b] = F.relu(bn(sd, q + "bn2.", F.conv2d(y, sd[q + "conv2.weight"], padding=1)) + xs[b])
    out = []
    for i in range(outputs):
        y = 0
        for j, x in enumerate(xs):
            q = f"{p}fuse_layers.{i}.{j}."
            if j == i:
                y = y + x
            elif j > i:  # coarser: 1x1 conv + BN, nearest upsampling x 2^(j-i)
                y = y + F.interpolate(bn(sd, q + "1.", F.conv2d(x, sd[q + "0.weight"])), scale_factor=2 ** (j - i),
                                      mode="nearest")
            else:  # finer: i-j stride-2 3x3 conv + BN, ReLU between
                for k in range(i - j):
                    x = conv_bn(sd, f"{q}{k}.", x, stride=2, relu=k < i - j - 1)
                y = y + x
        out.append(F.relu(y))
    return out


def hrnet_stage3(sd, p, x):
    x = resnet_stem(sd, p, x)
    xs = hr_module(sd, p + "stage2.0.", [conv_bn(sd, p + "transition1.0.", x),
                                         conv_bn(sd, p + "transition1.1.0.", x, stride=2)], 2)
    xs = [xs[0], xs[1], conv_bn(sd, p + "transition2.2.0.", xs[1], stride=2)]
    for m in range(4):
        xs = hr_module(sd, f"{p}stage3.{m}.", xs, 3 if m < 3 else 1)
    return xs[0]


def transformer(sd, p, x, heads, scale, k, pos):
    """Pre-norm blocks (LayerNorm eps 1e-5); qkv without bias; sine-full: pos re-added to the patches from block 2."""
    depth = 1 + max(int(key[len(p):].split(".")[0]) for key in sd if key.startswith(p))
    n, t, d = x.shape
    for i in range(depth):
        q_ = f"{p}{i}."
        if i > 0:
            x = torch.cat([x[:, :k], x[:, k:] + pos], dim=1)
        y = F.layer_norm(x, (d,), sd[q_ + "0.fn.norm.weight"], sd[q_ + "0.fn.norm.bias"], eps=1e-5)
        q, kk, v = (z.reshape(n, t, heads, d // heads).transpose(1, 2)
                    for z in F.linear(y, sd[q_ + "0.fn.fn.to_qkv.weight"]).chunk(3, dim=-1))
        a = torch.einsum("bhid,bhjd->bhij", q, kk) * scale
        y = torch.einsum("bhij,bhjd->bhid", a.softmax(-1), v).transpose(1, 2).reshape(n, t, d)
        x = x + F.linear(y, sd[q_ + "0.fn.fn.to_out.0.weight"], sd[q_ + "0.fn.fn.to_out.0.bias"])
        y = F.layer_norm(x, (d,), sd[q_ + "1.fn.norm.weight"], sd[q_ + "1.fn.norm.bias"], eps=1e-5)
        y = F.gelu(F.linear(y, sd[q_ + "1.fn.fn.net.0.weight"], sd[q_ + "1.fn.fn.net.0.bias"]))
        x = x + F.linear(y, sd[q_ + "1.fn.fn.net.3.weight"], sd[q_ + "1.fn.fn.net.3.bias"])
    return x


def reference_forward(sd, arch, x, head_scaled=None):
    """`head_scaled`: the attention scale, (D/heads)^-1/2 if True, D^-1/2 if False; default the official code's."""
    cfg = tokenpose_config(arch)
    heads = OFFICIAL_HEADS[arch]
    b = "features." if cfg.variant == "s" else "transformer."
    if cfg.variant == "s":
        feature = resnet_stem(sd, b, x)
    elif cfg.variant in "bl":
        feature = hrnet_stage3(sd, "pre_feature.", x)
    else:
        feature = x
    ph, pw = cfg.patch_hw
    n, c, h, w = feature.shape
    # einops 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', written with unfold: one row per patch, row-major
    patches = feature.unfold(2, ph, ph).unfold(3, pw, pw)  # [n, c, h/ph, w/pw, ph, pw]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(n, (h // ph) * (w // pw), ph * pw * c)
    tokens = F.linear(patches, sd[b + "patch_to_embedding.weight"], sd[b + "patch_to_embedding.bias"])
    pos = sd[b + "pos_embedding"]
    k, d = sd[b + "keypoint_token"].shape[1:]
    t = torch.cat([sd[b + "keypoint_token"].expand(n, -1, -1), tokens + pos], dim=1)
    if head_scaled is None:
        head_scaled = cfg.variant != "s"  # S_base builds its Transformer without scale_with_head: dim ** -0.5
    scale = (d // heads) ** -0.5 if head_scaled else d ** -0.5
    if cfg.variant == "l":
        outs = []
        for j in (1, 2, 3):
            t = transformer(sd, f"{b}transformer{j}.layers.", t, heads, scale, k, pos)
            outs.append(t[:, :k])
        t = torch.cat(outs, dim=2)
    else:
        t = transformer(sd, f"{b}transformer.layers.", t, heads, scale, k, pos)[:, :k]
    head = [i for i in range(4) if f"{b}mlp_head.{i}.weight" in sd]
    for i in head:
        p = f"{b}mlp_head.{i}."
        t = F.layer_norm(t, t.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps=1e-5) if i % 2 == 0 else \
            F.linear(t, sd[p + "weight"], sd[p + "bias"])
    return t.reshape(n, k, 64, 48)


# ------------------------------------------------------------------ tests


def test_official_key_names_and_shapes():
    with torch.device("meta"):
        sds = {a: TokenPose(tokenpose_config(a)).state_dict() for a in OFFICIAL_HEADS}
    expected = {
        "tokenpose-t": {"transformer.keypoint_token": (1, 17, 192), "transformer.pos_embedding": (1, 256, 192),
                        "transformer.patch_to_embedding.weight": (192, 3 * 16 * 12),
                        "transformer.transformer.layers.11.0.fn.fn.to_qkv.weight": (576, 192),
                        "transformer.transformer.layers.11.0.fn.fn.to_out.0.bias": (192,),
                        "transformer.transformer.layers.0.1.fn.fn.net.3.weight": (192, 576),
                        "transformer.mlp_head.1.weight": (384, 192), "transformer.mlp_head.3.weight": (3072, 384)},
        "tokenpose-s": {"features.conv1.weight": (64, 3, 3, 3), "features.layer1.0.downsample.0.weight": (256, 64, 1, 1),
                        "features.layer1.3.bn3.running_var": (256,), "features.pos_embedding": (1, 256, 192),
                        "features.patch_to_embedding.weight": (192, 256 * 12)},
        "tokenpose-s-v2": {"features.pos_embedding": (1, 768, 192), "features.patch_to_embedding.weight": (192, 1024)},
        "tokenpose-b": {"pre_feature.transition1.0.0.weight": (32, 256, 3, 3),
                        "pre_feature.transition1.1.0.0.weight": (64, 256, 3, 3),
                        "pre_feature.stage2.0.fuse_layers.0.1.0.weight": (32, 64, 1, 1),
                        "pre_feature.stage2.0.fuse_layers.1.0.0.0.weight": (64, 32, 3, 3),
                        "pre_feature.transition2.2.0.0.weight": (128, 64, 3, 3),
                        "pre_feature.stage3.0.fuse_layers.2.0.0.0.weight": (32, 32, 3, 3),
                        "pre_feature.stage3.0.fuse_layers.2.0.1.0.weight": (128, 32, 3, 3),
                        "pre_feature.stage3.3.fuse_layers.0.2.0.weight": (32, 128, 1, 1),
                        "pre_feature.stage3.3.branches.2.3.conv2.weight": (128, 128, 3, 3),
                        "transformer.patch_to_embedding.weight": (192, 32 * 12)},
        "tokenpose-l": {"pre_feature.transition1.0.0.weight": (48, 256, 3, 3),
                        "transformer.transformer3.layers.7.1.fn.fn.net.3.weight": (192, 576),
                        "transformer.mlp_head.0.weight": (576,), "transformer.mlp_head.1.weight": (3072, 576)},
    }
    for arch, shapes in expected.items():
        assert {k: tuple(sds[arch][k].shape) for k in shapes} == shapes, arch
    assert "pre_feature.stage3.3.fuse_layers.1.0.0.0.weight" not in sds["tokenpose-b"]  # last module: branch 0 only
    assert "transformer.mlp_head.2.weight" not in sds["tokenpose-l"]  # one Linear: 576 > 384 / 2
    block = {k.split(".", 5)[5] for k in sds["tokenpose-t"] if k.startswith("transformer.transformer.layers.0.")}
    assert block == {"fn.norm.weight", "fn.norm.bias", "fn.fn.to_qkv.weight", "fn.fn.to_out.0.weight",
                     "fn.fn.to_out.0.bias", "fn.fn.net.0.weight", "fn.fn.net.0.bias", "fn.fn.net.3.weight",
                     "fn.fn.net.3.bias"}  # no qkv bias


def test_sine_encoding_as_the_official_formula():
    """pos[0, r*w + c] = [y-part, x-part]; each part sin/cos interleaved over frequencies 10000^(2(i//2)/(D/2))."""
    h, w, d = 4, 3, 8
    pos = sine_position_embedding((h, w), d)[0]
    r, c = 2, 1
    y, x = (r + 1) / (h + 1e-6) * 2 * math.pi, (c + 1) / (w + 1e-6) * 2 * math.pi
    freq = [10000 ** (2 * (i // 2) / (d // 2)) for i in range(d // 2)]
    part = lambda v: [math.sin(v / freq[i]) if i % 2 == 0 else math.cos(v / freq[i]) for i in range(d // 2)]  # noqa: E731
    assert torch.allclose(pos[r * w + c], torch.tensor(part(y) + part(x)), atol=1e-6)


@pytest.mark.parametrize("arch", list(OFFICIAL_HEADS))
def test_loaded_official_file_matches_functional_reference(arch):
    sd = random_state_dict(build_tokenpose(tokenpose_config(arch)), seed=3)
    model = teacher_from_checkpoint({"epoch": 210, "model": "pose_tokenpose", "perf": 0.75,
                                     "state_dict": {"module." + k: v for k, v in sd.items()}}, Path(f"{arch}.pth"))
    assert model.config.arch == arch and model.config.heads == OFFICIAL_HEADS[arch]
    x = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = model(x), reference_forward(sd, arch, x)
    assert out.shape == ref.shape == (1, 17, 64, 48)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert ref.abs().max() > 0.1


def test_presets_cover_the_official_variants():
    assert {a: (c.variant, c.dim, c.depth, c.heads, c.patch_hw) for a, c in ARCHS.items() if a in OFFICIAL_HEADS} == {
        "tokenpose-t": ("t", 192, 12, 16, (16, 12)), "tokenpose-s": ("s", 192, 12, 8, (4, 3)),
        "tokenpose-s-v2": ("s", 192, 12, 8, (2, 2)), "tokenpose-b": ("b", 192, 12, 8, (4, 3)),
        "tokenpose-l": ("l", 192, 8, 12, (4, 3))}


def to_mmpose_port(sd: dict, variant: str) -> dict:
    """The official layout rewritten as mmpose's port (mmpose/models/backbones/tokenpose.py) saves it: everything
    under backbone.; `layers` = [stem Sequential (S) or the HRNet again (B, L), mlp head]; mmpose's HRNet also
    holds a stage 4 and stage 3's fusions into every branch."""
    b = "features." if variant == "s" else "transformer."
    stem = {"conv1.": "layers.0.0.", "bn1.": "layers.0.1.", "conv2.": "layers.0.3.", "bn2.": "layers.0.4.",
            "layer1.": "layers.0.6."}
    out = {}
    for k, v in sd.items():
        if k.startswith("pre_feature."):
            out["backbone." + k] = v
            out["backbone.layers.0." + k[len("pre_feature."):]] = v
            continue
        name = k[len(b):]
        if name.startswith("mlp_head."):
            name = "layers.1." + name[len("mlp_head."):]
        for old, new in stem.items():
            if variant == "s" and name.startswith(old):
                name = new + name[len(old):]
        out["backbone." + name] = v
    if variant in "bl":
        out["backbone.pre_feature.stage4.0.branches.3.0.conv1.weight"] = torch.zeros(256, 256, 3, 3)
        out["backbone.pre_feature.transition3.3.0.0.weight"] = torch.zeros(256, 128, 3, 3)
        out["backbone.pre_feature.stage3.3.fuse_layers.1.0.0.0.weight"] = torch.zeros(64, 32, 3, 3)
    return out


@pytest.mark.parametrize("arch", ["tokenpose-b", "tokenpose-s"])
def test_mmpose_port_file_matches_its_function(arch, tmp_path):
    """mmpose's port: same weights under other names, D^-1/2 attention in B (the official B scales by head),
    trained with UDP targets: the loaded model computes the port's function and decodes with UDP."""
    cfg = tokenpose_config(arch)
    sd = random_state_dict(build_tokenpose(cfg), seed=5)
    torch.save({"meta": {}, "state_dict": to_mmpose_port(sd, cfg.variant)}, tmp_path / "port.pth")
    from kdcache.teacher import load_teacher
    model = load_teacher(tmp_path / "port.pth")
    assert model.codec.name == "udp-heatmap" and model.config.arch == f"{arch}-mmpose"
    x = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ref = model(x), reference_forward(sd, arch, x, head_scaled=False)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    if arch == "tokenpose-b":  # the official B's scale gives another function
        assert (reference_forward(sd, arch, x) - ref).abs().max() > 1e-2 * ref.abs().max()
