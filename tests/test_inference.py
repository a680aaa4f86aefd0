"""Model input and the shared forward: ImageNet normalisation, bf16 on GPU only, flip averaging."""

import numpy as np
import pytest
import torch
from torch import nn

from kdcache.codec import UDPHeatmap
from kdcache.inference import IMAGENET_MEAN, IMAGENET_STD, predict_heatmaps, to_input_tensor
from kdcache.keypoints import COCO_17


def test_to_input_tensor_normalises_numpy_and_torch():
    crops = np.zeros((2, 4, 3, 3), dtype=np.uint8)
    crops[0, 0, 0] = (124, 116, 104)  # ~ImageNet mean
    crops[1, 3, 2] = (255, 0, 255)
    x = to_input_tensor(crops)
    assert x.shape == (2, 3, 4, 3) and x.dtype == torch.float32
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), (np.array([124, 116, 104]) - mean) / std, atol=1e-6)
    np.testing.assert_allclose(x[1, :, 3, 2].numpy(), (np.array([255, 0, 255]) - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 1, 1].numpy(), -mean / std, rtol=1e-6)
    # Equal to ToTensor (/255) + NormalizeTensor with the 0-1 constants.
    ref = (crops.transpose(0, 3, 1, 2) / 255.0 - np.array([0.485, 0.456, 0.406])[:, None, None]) \
        / np.array([0.229, 0.224, 0.225])[:, None, None]
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-5)
    torch.testing.assert_close(to_input_tensor(torch.from_numpy(crops)), x)
    with pytest.raises(ValueError):
        to_input_tensor(crops[0])


class _Heatmapper(nn.Module):
    """[N, 3, H, W] -> [N, 17, H/4, W/4]: pooling then a 1x1 conv, random and left/right asymmetric."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 17, 1)
        self.ramp = nn.Parameter(torch.linspace(0, 1, 6), requires_grad=False)  # breaks mirror symmetry

    def forward(self, x):
        return self.conv(nn.functional.avg_pool2d(x, 4)) * self.ramp


def test_predict_heatmaps_is_the_model_on_normalised_crops_and_flip_test_averages_the_mirror():
    model = _Heatmapper().eval()
    crops = np.random.default_rng(0).integers(0, 256, (2, 32, 24, 3), dtype=np.uint8)
    codec = UDPHeatmap.for_input((32, 24))
    with torch.no_grad():
        plain = model(to_input_tensor(crops))
        mirrored = model(to_input_tensor(np.ascontiguousarray(crops[:, :, ::-1])))
    got = predict_heatmaps(model, crops, codec, COCO_17)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, plain)
    # Flip test: the mirror's maps mirrored back along the width with left/right channels swapped (no shift).
    back = mirrored[:, list(COCO_17.flip_index)].flip(-1)
    torch.testing.assert_close(predict_heatmaps(model, crops, codec, COCO_17, flip_test=True), (plain + back) / 2)
    assert not torch.allclose(back, plain)  # the model is not mirror-symmetric: the average is a real check
