"""ONNX export of a pose model, checked against PyTorch with onnxruntime.

onnx and onnxruntime are an optional extra (`pip install 'kdcache[export]'`), imported only here.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcache.errors import UserError

log = logging.getLogger(__name__)

# fp32 ONNX Runtime vs PyTorch on CPU, for heatmaps peaking at <= 1 (scaled up for larger ones: the error of
# reassociated float sums grows with the values; students measure ~1e-8 to 1e-5).
MAX_ABS_DIFF = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "heatmaps"


def export_onnx(model: nn.Module, onnx_path: Path, input_hw: tuple[int, int], opset: int = 17) -> float:
    """Write `model` as ONNX with a dynamic batch dimension and check it with onnxruntime.

    The graph takes `input: [N, 3, H, W] float32` (RGB, ImageNet-normalised, (H, W) = input_hw) and returns
    `heatmaps: [N, K, H/4, W/4] float32`. The check runs a batch of 2 random inputs (a batch size other than
    the one traced, so the dynamic axis is exercised) through both runtimes on CPU.

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
