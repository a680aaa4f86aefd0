"""ONNX export: same heatmaps as PyTorch through onnxruntime, any batch size; clear error without the extra."""

import json
import sys

import numpy as np
import pytest
import torch

from kdcache.errors import UserError
from kdcache.export import export_onnx
from kdcache.keypoints import COCO_17
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
    diff = export_onnx(model, path, INPUT_HW, COCO_17)
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
        export_onnx(torch.nn.Conv2d(3, 17, 1), tmp_path / "x.onnx", (8, 8), COCO_17)


def test_disagreement_is_a_user_error(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import kdcache.export

    monkeypatch.setattr(kdcache.export, "MAX_ABS_DIFF", -1.0)  # any difference, even 0, is too much
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_onnx(torch.nn.Conv2d(3, 17, 1), tmp_path / "x.onnx", (8, 8), COCO_17)


def test_export_writes_the_preprocessing_into_the_metadata(tmp_path):
    """A runtime can feed the graph and read its output from the file alone."""
    import json

    import onnx

    from kdcache.inference import IMAGENET_MEAN, IMAGENET_STD, to_input_tensor

    model = _student()
    export_onnx(model, tmp_path / "s.onnx", INPUT_HW, COCO_17)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "s.onnx")).metadata_props}
    assert json.loads(meta["input_size_hw"]) == list(INPUT_HW)
    assert json.loads(meta["heatmap_size_hw"]) == [INPUT_HW[0] // 4, INPUT_HW[1] // 4]
    assert meta["color_order"] == "RGB" and meta["input_name"] == "input" and meta["output_name"] == "heatmaps"
    assert json.loads(meta["keypoint_names"]) == list(COCO_17.names) and meta["keypoint_set"] == "coco-17"
    assert [tuple(p) for p in json.loads(meta["flip_pairs"])] == list(COCO_17.flip_pairs)
    assert json.loads(meta["codec"]) == {"name": "udp-heatmap", "input_hw": list(INPUT_HW),
                                         "heatmap_hw": [INPUT_HW[0] // 4, INPUT_HW[1] // 4], "sigma": 2.0}
    assert json.loads(meta["model"])["backbone"] == "mobilenetv3_small_100"
    # The recipe the metadata gives reproduces kdcache's own normalisation.
    crop = np.random.default_rng(0).integers(0, 256, (1, *INPUT_HW, 3), dtype=np.uint8)
    mean, std = np.array(json.loads(meta["mean"])), np.array(json.loads(meta["std"]))
    by_metadata = ((crop.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(by_metadata, to_input_tensor(crop).numpy(), atol=1e-5)
    assert list(IMAGENET_MEAN) == json.loads(meta["mean"]) and list(IMAGENET_STD) == json.loads(meta["std"])


def test_the_exported_keypoint_set_is_the_one_the_student_recorded(tmp_path):
    """A built-in set by its recorded name; a described one needs its file again (and only it); a teacher that
    records no set goes by its count, or by --keypoint-set."""
    from kdcache.export import keypoint_set_of_model
    from kdcache.keypoints import keypoint_set

    def student(**fields):
        return build_student(StudentConfig("mobilenetv3_small_100", input_hw=INPUT_HW, head_channels=16, **fields),
                             load_pretrained=False)

    crowd = student(num_keypoints=14, keypoint_set="crowdpose-14")
    assert keypoint_set_of_model(crowd, None, "m") is keypoint_set("crowdpose-14")
    with pytest.raises(UserError, match="trained for the keypoint set crowdpose-14, not aic-14"):
        keypoint_set_of_model(crowd, "aic-14", "m")
    head = student(num_keypoints=5, keypoint_set="head-5")
    with pytest.raises(UserError, match="head-5, a keypoint set described in a file: pass that file"):
        keypoint_set_of_model(head, None, "m")
    description = {"name": "head-5", "keypoints": ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]}
    (tmp_path / "h.json").write_text(json.dumps(description))
    assert keypoint_set_of_model(head, str(tmp_path / "h.json"), "m").flip_pairs == ((1, 2), (3, 4))
    teacher = student(num_keypoints=14, keypoint_set="")  # as a teacher: no recorded set, only a count
    with pytest.raises(UserError, match="pass --keypoint-set crowdpose-14 or aic-14"):
        keypoint_set_of_model(teacher, None, "m")
    assert keypoint_set_of_model(teacher, "aic-14", "m") is keypoint_set("aic-14")
