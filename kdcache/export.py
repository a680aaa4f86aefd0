"""ONNX export of a pose model, checked against PyTorch with onnxruntime.

onnx and onnxruntime are an optional extra (`pip install 'kdcache[export]'`), imported only here.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcache import __version__
from kdcache.codec import UDPHeatmap
from kdcache.errors import UserError
from kdcache.inference import IMAGENET_MEAN, IMAGENET_STD
from kdcache.keypoints import KeypointSet, is_built_in, keypoint_set, keypoint_set_named, keypoint_set_with

log = logging.getLogger(__name__)

# fp32 ONNX Runtime vs PyTorch on CPU, for heatmaps peaking at <= 1 (scaled up for larger ones: the error of
# reassociated float sums grows with the values; students measure ~1e-8 to 1e-5).
MAX_ABS_DIFF = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "heatmaps"


def keypoint_set_of_model(model: nn.Module, chosen: str | None, where: str) -> KeypointSet:
    """The keypoint set whose names and flip pairs go into the export's metadata: the one a student recorded
    (a set described in a file needs that file again, `chosen`), else `chosen`, else the set with the model's
    keypoint count.

    Raises:
        UserError: `chosen` is not the recorded set, does not have the model's count, or is missing for a
            described set.
    """
    named = getattr(model.config, "keypoint_set", None)  # a student records its set; teachers by their count
    count = int(model.config.num_keypoints)
    picked = keypoint_set_named(chosen) if chosen else None
    if named and picked is not None and picked.name != named:
        raise UserError(f"{where} was trained for the keypoint set {named}, not {picked.name}: drop --keypoint-set, "
                        f"or pass the description of {named}")
    if named and picked is None:
        if not is_built_in(named):
            raise UserError(f"{where} was trained for {named}, a keypoint set described in a file: pass that file "
                            "as --keypoint-set FILE")
        picked = keypoint_set(named)
    if picked is None:
        return keypoint_set_with(count, where)
    if picked.num_keypoints != count:
        raise UserError(f"{where} predicts {count} keypoints but the keypoint set {picked.name} has "
                        f"{picked.num_keypoints}; pass the set it was trained for")
    return picked


def export_onnx(model: nn.Module, onnx_path: Path, input_hw: tuple[int, int], keypoint_set: KeypointSet,
                opset: int = 17) -> float:
    """Write `model` as ONNX with a dynamic batch dimension and check it with onnxruntime.

    The graph takes `input: [N, 3, H, W] float32` (RGB, ImageNet-normalised, (H, W) = input_hw) and returns
    `heatmaps: [N, K, H/4, W/4] float32`; the file's metadata says so (`preprocessing_metadata`). The check
    runs a batch of 2 random inputs (a batch size other than the one traced, so the dynamic axis is
    exercised) through both runtimes on CPU.

    Returns:
        The largest absolute difference between the ONNX Runtime and PyTorch heatmaps.

    Raises:
        UserError: onnx/onnxruntime missing, or the difference exceeds MAX_ABS_DIFF (times the heatmap
            maximum where that is above 1).
    """
    try:
        import onnx  # noqa: F401  (the TorchScript exporter needs it to serialise the graph)
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnx export needs the optional extra: pip install 'kdcache[export]'") from None

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    if next(model.parameters()).device.type != "cpu":
        # Trace and compare on the CPU: cuDNN's TF32 convolutions alone would exceed the tolerance.
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    try:
        _export(model, onnx_path, torch.zeros(1, 3, *input_hw), opset)
        write_metadata(onnx_path, preprocessing_metadata(model, input_hw, keypoint_set))
        x = torch.randn(2, 3, *input_hw, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = model(x).float().numpy()
    finally:
        model.train(was_training)

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    if got.shape != expected.shape:
        raise UserError(f"ONNX model {onnx_path} gives {got.shape}, PyTorch {expected.shape}; export is broken")
    max_diff = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    log.info("ONNX %s: max |onnxruntime - torch| = %.3g (heatmap max %.3g)", onnx_path, max_diff, scale)
    tolerance = MAX_ABS_DIFF * max(1.0, scale)
    if not max_diff <= tolerance:  # also catches NaN
        raise UserError(
            f"ONNX model {onnx_path} differs from PyTorch by {max_diff:.3g} (> {tolerance:.3g}, heatmap max "
            f"{scale:.3g}); try another opset (now {opset})"
        )
    return max_diff


def preprocessing_metadata(model: nn.Module, input_hw: tuple[int, int], keypoint_set: KeypointSet) -> dict[str, str]:
    """What a runtime needs besides the graph to feed it and read its output, as ONNX metadata strings."""
    config = getattr(model, "config", None)
    codec = getattr(model, "codec", None) or UDPHeatmap.for_input(input_hw)  # a kdcache model names its own
    return {
        "kdcache_version": __version__,
        "model": json.dumps(config.to_dict() if config is not None else {}),
        "input_name": INPUT_NAME,
        "input_size_hw": json.dumps(list(input_hw)),
        "input_layout": "NCHW float32",
        "color_order": "RGB",
        # x = (pixel - mean) / std with pixels on the 0-255 scale, per channel in color_order.
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "crop": "top-down person crop: box center, aspect w/h 0.75, padding 1.25, UDP affine to (W-1, H-1)",
        "output_name": OUTPUT_NAME,
        "heatmap_size_hw": json.dumps(list(codec.heatmap_hw)),
        "heatmap_decoding": "UDP: argmax + DARK refinement; crop pixel = heatmap pixel * (W-1)/(w-1)",
        "codec": json.dumps(codec.to_record()),
        "keypoint_set": keypoint_set.name,
        "keypoint_names": json.dumps(list(keypoint_set.names)),
        "flip_pairs": json.dumps([list(p) for p in keypoint_set.flip_pairs]),  # 0-based, for flip test
        "skeleton": json.dumps([list(p) for p in keypoint_set.skeleton]),  # 1-based, as in COCO files
    }


def write_metadata(onnx_path: Path, metadata: dict[str, str]) -> None:
    """Set `metadata_props` of an ONNX file in place (external weight files, if any, stay as they are)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(onnx_path))


def _export(model: nn.Module, onnx_path: Path, example: torch.Tensor, opset: int) -> None:
    """TorchScript-based exporter (`dynamo=False`): the torch.export one would add onnxscript to the extra."""
    # torch < 2.5 has only this exporter and no `dynamo` argument.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad():  # no autograd graph while tracing: faster, same ONNX
        # torch >= 2.9 warns that this exporter is legacy; it is still supported and needs no onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(onnx_path),
            **legacy,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
        )
