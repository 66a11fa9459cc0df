"""Tests for vmamba.export: ONNX export of classification and segmentation checkpoints, checked by onnxruntime.

Each export traces with ``torch.onnx.export(dynamo=True)``, which takes ~15-25 s on a small CPU, so the tests
export two tiny models only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from vmamba.export import check_onnx, main, read_onnx_metadata
from vmamba.loading import load_model
from vmamba.predict import main as predict_main

VIM_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32}
CLASS_NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def vim_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ClassificationTask-shaped checkpoint of a tiny Vim (our own model family)."""
    import vmamba.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", num_classes=3, **VIM_KWARGS)
    path = tmp_path_factory.mktemp("ckpt") / "vim.ckpt"
    hparams = {
        "model": "vim_tiny_patch16_224",
        "num_classes": 3,
        "class_names": CLASS_NAMES,
        "model_kwargs": VIM_KWARGS,
    }
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hparams},
        path,
    )
    return path


def test_export_classification(vim_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nested" / "vim.onnx"
    assert main(["--checkpoint", str(vim_ckpt), "-o", str(out)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["vim.onnx"]  # no temporary file left
    meta = read_onnx_metadata(out)
    assert (
        meta["task"] == "classification"
        and meta["class_names"] == CLASS_NAMES
        and meta["input_size"] == [3, 32, 32]
    )

    # Dynamic batch: a batch of 5 through onnxruntime matches the PyTorch model loaded by vmamba-predict.
    model = load_model(checkpoint=str(vim_ckpt)).model
    x = torch.randn(5, 3, 32, 32)
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()}
    )
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-3)

    # The check can fail: a model whose weights changed after export no longer matches the file.
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="differ"):
        check_onnx(model, out, (3, 32, 32))


@pytest.mark.slow
def test_export_segmentation_via_predict_entry(tmp_path: Path, capsys) -> None:
    from vmamba.seg import create_segmentation_model

    torch.manual_seed(0)
    kwargs = {"fpn_channels": 16, "channels": 8}
    model = create_segmentation_model("test_resnet", 4, decoder="fpn", **kwargs)
    ckpt = tmp_path / "seg.ckpt"
    hparams = {"backbone": "test_resnet", "decoder": "fpn", "num_classes": 4, "decoder_kwargs": kwargs}
    hparams["data_config"] = {
        "task": "segmentation",
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hparams},
        ckpt,
    )
    out = tmp_path / "seg.onnx"
    assert predict_main(["export", "--checkpoint", str(ckpt), "--crop-size", "32", "48", "-o", str(out)]) == 0
    meta = read_onnx_metadata(out)
    assert meta["task"] == "segmentation" and meta["input_size"] == [3, 32, 48] and meta["num_classes"] == 4
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 48)).astype(np.float32)
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert got.shape == (1, 4, 32, 48)


def test_export_load_error(tmp_path: Path, capsys) -> None:
    assert main(["--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "cannot load the model" in capsys.readouterr().err
