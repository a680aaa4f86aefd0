"""Benchmark helpers: exact parameter and FLOP counts, sane timings, one table for all models and devices."""

import pytest
from torch import nn

from kdcache.bench import bench_models, count_gflops, count_params, format_table, measure_latency, resolve_devices
from kdcache.errors import UserError


def _tiny_net() -> nn.Module:
    # [N, 3, 8, 6] -> conv 3->4 k3 -> BN -> ReLU -> flatten 4*8*6=192 -> linear 192->5
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(192, 5))


def test_count_params_equals_numel_sum():
    net = _tiny_net()
    assert count_params(net) == (4 * 3 * 9 + 4) + (4 + 4) + (192 * 5 + 5)
    shared = nn.Linear(3, 3)
    assert count_params(nn.Sequential(shared, shared)) == 12  # a shared layer counts once


@pytest.mark.parametrize("batch", [1, 3])
def test_gflops_match_the_analytic_count(batch):
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_gflops(conv, (16, 12), batch=batch) == pytest.approx(2 * 16 * 12 * 8 * 3 * 9 / 1e9)
    deconv = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)  # every input pixel meets k*k outputs
    assert count_gflops(nn.Sequential(conv, deconv), (16, 12), batch=batch) == pytest.approx(
        (2 * 16 * 12 * 8 * 3 * 9 + 2 * 16 * 12 * 8 * 4 * 16) / 1e9)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 7))
    assert count_gflops(linear, (4, 5), batch=batch) == pytest.approx(2 * 60 * 7 / 1e9)


def test_latency_is_positive_and_keeps_training_mode():
    net = _tiny_net().train()
    ms = measure_latency(net, (8, 6), batch=2, warmup=1, iters=3)
    assert 0 < ms < 1000
    assert net.training  # measured in eval mode, then put back
    assert net[1].num_batches_tracked.item() == 0  # BatchNorm statistics untouched


def test_latency_under_bf16_autocast():
    net = _tiny_net()
    assert measure_latency(net, (8, 6), batch=2, warmup=1, iters=2, bf16=True) > 0


def test_bench_models_rows_and_table():
    models = {"tiny-a": _tiny_net(), "tiny-b": nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(96, 5))}
    # Two CPU spellings stand in for cpu + cuda: one column pair per device, side by side.
    rows = bench_models(models, (8, 6), devices=["cpu", "cpu:0"], batch=4, iters=3)
    assert [r["name"] for r in rows] == ["tiny-a", "tiny-b"]
    assert rows[0]["params_m"] == pytest.approx(count_params(models["tiny-a"]) / 1e6)
    assert rows[1]["gflops"] == pytest.approx((2 * 48 * 2 * 3 + 2 * 96 * 5) / 1e9)
    for r in rows:
        assert list(r["timings"]) == ["cpu", "cpu:0"] and r["batch"] == 4
        assert all(t["latency_ms_b1"] > 0 and t["crops_per_s"] > 0 and t["precision"] == "fp32"
                   for t in r["timings"].values())
    lines = format_table(rows).splitlines()
    assert lines[0] == ("| model | params (M) | GFLOPs | cpu b1 (ms) | cpu crops/s @ b4 | cpu:0 b1 (ms) "
                        "| cpu:0 crops/s @ b4 |")
    assert "tiny-a" in lines[2] and "tiny-b" in lines[3]
    assert all(line.count("|") == lines[0].count("|") for line in lines[:4])
    assert lines[4] == "" and lines[5].startswith("cpu: ") and lines[5].endswith(" threads")


def test_bf16_applies_to_cuda_only_and_model_goes_home():
    net = _tiny_net()
    rows = bench_models({"n": net}, (8, 6), devices=["cpu"], batch=2, iters=2, bf16=True)
    assert rows[0]["timings"]["cpu"]["precision"] == "fp32"  # CPU numbers stay fp32
    assert next(net.parameters()).device.type == "cpu"


def test_devices_default_and_refusals(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_devices(None) == ["cpu"]
    assert resolve_devices("cpu, cpu") == ["cpu"]
    for spec, needle in [("cuda", "no CUDA device"), ("cpu,cuda:1", "no CUDA device"), ("tpu", "not a device"),
                         (",", "empty")]:
        with pytest.raises(UserError, match=needle):
            resolve_devices(spec)


def test_bench_command_refuses_missing_cuda_in_one_line(monkeypatch, capsys):
    import torch

    from kdcache.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "nope.pt", "--device", "cpu,cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err


def test_bench_command_prints_one_table(tmp_path, capsys):
    import torch

    from kdcache.checkpoint import checkpoint_dict
    from kdcache.cli import main
    from kdcache.vitpose import build_vitpose, vitpose_config

    path = tmp_path / "nano.pt"
    torch.save(checkpoint_dict(build_vitpose(vitpose_config("vitpose-nano", input_hw=(64, 48)))), path)
    assert main(["bench", str(path), str(path), "--device", "cpu", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| model | params (M) | GFLOPs | cpu b1 (ms) | cpu crops/s @ b2 |")
    assert lines[2].startswith(f"| {path} |") and lines[-1].startswith("cpu: ")
