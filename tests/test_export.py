"""ONNX export: same heatmaps as PyTorch through onnxruntime, any batch size; clear error without the extra."""

import sys

import numpy as np
import pytest
import torch

from kdcache.errors import UserError
from kdcache.export import export_onnx
from kdcache.student import StudentConfig, build_student

INPUT_HW = (128, 96)  # small crops keep the test fast; the graph is the same


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_student(StudentConfig("mobilenetv3_small_100", input_hw=INPUT_HW, head_channels=16))
    with torch.no_grad():  # O(1) heatmaps, so a 1e-4 agreement means something (the init gives ~1e-3)
        torch.nn.init.normal_(model.head[-1].weight, std=5.0)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial eval-mode statistics to fold
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.train()


def test_export_matches_pytorch_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _student()
    path = tmp_path / "out" / "student.onnx"
    diff = export_onnx(model, path, INPUT_HW)
    assert path.is_file() and 0 <= diff <= 1e-4
    assert model.training  # exported in eval mode, then put back

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, *INPUT_HW)  # neither the traced batch (1) nor the checked one (2)
    (got,) = session.run(["heatmaps"], {"input": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    assert got.shape == (3, 17, 32, 24)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_missing_extra_is_a_user_error(tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'kdcache\[export\]'"):
        export_onnx(torch.nn.Conv2d(3, 17, 1), tmp_path / "x.onnx", (8, 8))


def test_disagreement_is_a_user_error(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import kdcache.export

    monkeypatch.setattr(kdcache.export, "MAX_ABS_DIFF", -1.0)  # any difference, even 0, is too much
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_onnx(torch.nn.Conv2d(3, 17, 1), tmp_path / "x.onnx", (8, 8))
