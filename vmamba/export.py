"""Export a trained classification or segmentation model to ONNX and check it with onnxruntime.

Run it as ``vmamba-export ...`` (also ``vmamba-predict export ...`` or ``python -m vmamba.export ...``)::

    vmamba-export --checkpoint run/best.ckpt -o model.onnx
    vmamba-export -m vim_tiny_patch16_224 --checkpoint vim_t.pth -o vim_t.onnx --num-classes 1000

The model is loaded exactly as ``vmamba-predict`` loads it (:mod:`vmamba.loading` (Lightning checkpoint, timm name plus weights, or a
``save_for_hf`` folder). The graph takes ``input`` (N, 3, H, W) normalised images and returns ``logits``:
(N, num_classes) for classification, (N, num_classes, H, W) for segmentation. The batch dimension is dynamic;
H and W are fixed at the classification input size or the segmentation crop size (run sliding windows of that
size). Export uses ``torch.onnx.export(dynamo=True)``; the selective scan takes its pure-PyTorch path while
exporting. Preprocessing and class names are stored in the ONNX metadata (``vmamba.*`` keys).

The file is written only after the check passes: onnxruntime (CPU) and PyTorch must agree on a random batch
within ``--atol``/``--rtol``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vmamba.contract import as_hw
from vmamba.kernels import decompose_scans
from vmamba.loading import LoadedModel, add_model_arguments, load_model_from_args

__all__ = ["build_parser", "check_onnx", "export_input_size", "export_onnx", "main", "read_onnx_metadata"]


def export_input_size(
    loaded: LoadedModel, img_size: int | None = None, slide_window: Sequence[int] | None = None
) -> tuple[int, int, int]:
    """The ``(C, H, W)`` the graph is traced at: the classification input size, or the segmentation window
    (``slide_window``, else the task's, else the training crop)."""
    channels = int(loaded.data_config["input_size"][0])
    if loaded.task == "segmentation":
        size = as_hw(slide_window) or as_hw(loaded.slide_window) or as_hw(img_size)
    else:
        size = as_hw(img_size)
    return (channels, *(size or as_hw(loaded.data_config["input_size"])))


def _metadata(loaded: LoadedModel, input_size: tuple[int, int, int]) -> dict[str, str]:
    """Everything a consumer needs to feed the graph and read its output, as ONNX metadata strings."""
    cfg = loaded.data_config
    return {
        "vmamba.task": loaded.task,
        "vmamba.model": loaded.name,
        "vmamba.num_classes": str(loaded.num_classes),
        "vmamba.class_names": json.dumps(loaded.class_names),
        "vmamba.input_size": json.dumps(list(input_size)),
        "vmamba.mean": json.dumps([float(v) for v in cfg["mean"]]),
        "vmamba.std": json.dumps([float(v) for v in cfg["std"]]),
        "vmamba.interpolation": str(cfg.get("interpolation", "")),
        "vmamba.crop_pct": str(cfg.get("crop_pct", "")),
        "vmamba.data_config": json.dumps(cfg),
    }


def export_onnx(
    loaded: LoadedModel,
    output: str | os.PathLike,
    input_size: tuple[int, int, int],
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Trace ``loaded.model`` on CPU at ``input_size`` and write ONNX with ``vmamba.*`` metadata to ``output``.

    Returns the path written. The model is moved to CPU and put in eval mode.
    """
    import onnx

    model = loaded.model.cpu().eval()
    example = torch.randn(2 if dynamic_batch else 1, *input_size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # decompose_scans: before torch 2.8 the exporter meets the scans as custom ops and decomposes them.
    with torch.no_grad(), decompose_scans():
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            # onnxscript's graph optimiser takes about 10 minutes on a 24-block Vim; the graph runs as well
            # without it (checked against onnxruntime below).
            optimize=False,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in _metadata(loaded, input_size).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, output)
    return output


def check_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int, int],
    batch: int = 2,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
) -> float:
    """Run ``path`` with onnxruntime (CPU) and ``model`` on one random batch; return the max abs difference.

    Raises ``RuntimeError`` when an output shape differs or ``|onnx - torch| > atol + rtol * |torch|`` anywhere.
    """
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_size, generator=generator)
    with torch.no_grad():
        expected = model.cpu().eval()(x).float().numpy()
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": x.numpy()})
    if got.shape != expected.shape:
        raise RuntimeError(f"onnxruntime output shape {got.shape} differs from PyTorch's {expected.shape}")
    diff = np.abs(got - expected)
    max_diff = float(diff.max()) if diff.size else 0.0
    if not np.all(diff <= atol + rtol * np.abs(expected)):
        raise RuntimeError(
            f"onnxruntime and PyTorch outputs differ: max |diff| {max_diff:.3g} exceeds atol {atol} + rtol {rtol}"
        )
    return max_diff


def build_parser() -> argparse.ArgumentParser:
    """The ``vmamba-export`` argument parser (model flags as in ``vmamba-predict``)."""
    parser = argparse.ArgumentParser(
        prog="vmamba-export",
        description="Export a trained model to ONNX and check it with onnxruntime.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--img-size", type=int, help="classification input size (default: the model's)")
    parser.add_argument(
        "--slide-window", "--crop-size", type=int, nargs="+", help="segmentation window size H [W]"
    )
    parser.add_argument("--output", "-o", help="ONNX file to write (default: {model}-{H}x{W}.onnx)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size at 1")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of the check")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of the check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vmamba-export`` / ``vmamba-predict export`` / ``python -m vmamba.export``; returns
    the exit code.

    0: written and checked; 1: export or check failed (nothing written); 2: the model could not be loaded;
    130: interrupted (nothing written).
    """
    args = build_parser().parse_args(argv)
    try:
        return _export(args)
    except KeyboardInterrupt:
        print("\nvmamba-export: interrupted; nothing was written (run the command again)", file=sys.stderr)
        return 130


def _export(args: argparse.Namespace) -> int:
    """Load, export, check and write; returns the exit code (see :func:`main`)."""
    loaded = load_model_from_args(args, "vmamba-export")
    if loaded is None:
        return 2
    input_size = export_input_size(loaded, args.img_size, args.slide_window)
    output = Path(args.output or f"{loaded.name}-{input_size[1]}x{input_size[2]}.onnx")
    start = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".onnx")
    os.close(fd)
    try:
        export_onnx(loaded, tmp_name, input_size, opset=args.opset, dynamic_batch=not args.static_batch)
        message = "not checked"
        if not args.no_check:
            batch = 1 if args.static_batch else 2
            max_diff = check_onnx(loaded.model, tmp_name, input_size, batch, args.atol, args.rtol)
            message = f"onnxruntime matches PyTorch (max |diff| {max_diff:.2e})"
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, output)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(error, KeyboardInterrupt):
            raise
        print(f"vmamba-export: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(f"Wrote {output} ({loaded.task}, input {list(input_size)}; {message}) in {seconds:.1f} s.")
    return 0


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``vmamba.*`` metadata of an exported file (``task``, ``class_names``, ``mean``...), JSON-decoded."""
    import onnx

    props = {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}
    decoded: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith("vmamba."):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
            decoded[key[len("vmamba.") :]] = value
    return decoded


if __name__ == "__main__":
    sys.exit(main())
