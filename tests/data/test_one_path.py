"""The same file gives the same tensor in validation, ``train.py predict`` and ``vmamba-predict``.

Awkward files (an EXIF-rotated JPEG, a 16-bit PNG, RGBA, a palette image, grayscale) go through the data
module's validation dataset, its predict dataset and the dataset of ``vmamba-predict`` (with the
``data_config`` read back from a checkpoint), and must give identical tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vmamba.data import ImageFolderDataModule, SegmentationFolderDataModule
from vmamba.imageio import IMAGE_EXTENSIONS, read_rgb
from vmamba.loading import load_model
from vmamba.predict import _ImageDataset, collect_inputs
from vmamba.preprocess import EvalPreprocess


def _pattern(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth pattern plus noise, so resizing and orientation errors change the tensor."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (yy * 255 // max(height - 1, 1) + xx * 3) % 256
    planes = [(base + 60 * c + rng.integers(0, 20, (height, width))) % 256 for c in range(channels)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def _write_awkward_files(folder: Path) -> list[str]:
    """EXIF-rotated JPEG, 16-bit PNG, RGBA, palette and grayscale images; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: stored 40 wide x 24 high, shown 24 x 40
    Image.fromarray(_pattern(24, 40, seed=1)).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    deep = (_pattern(30, 26, 1, seed=2)[..., 0].astype(np.uint16) * 257) // 3 + 1000
    Image.fromarray(deep.astype(np.uint16)).save(folder / "deep16.png")
    rgba = np.concatenate([_pattern(28, 28, seed=3), np.full((28, 28, 1), 90, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(folder / "alpha.png")
    Image.fromarray(_pattern(32, 30, seed=4)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "palette.png"
    )
    Image.fromarray(_pattern(36, 34, 1, seed=5)[..., 0]).save(folder / "gray.png")
    return ["alpha.png", "deep16.png", "gray.png", "palette.png", "rotated.jpg"]


def _predict_tensors(folder: Path, data_config: dict) -> dict[str, torch.Tensor]:
    """What ``vmamba-predict`` feeds the network for every file of ``folder``."""
    items = collect_inputs(folder)
    dataset = _ImageDataset(items, EvalPreprocess(data_config))
    out = {}
    for index, item in enumerate(items):
        _, tensor, _, error = dataset[index]
        assert error is None, error
        out[Path(item.key).name] = tensor
    return out


def _checkpoint(path: Path, hparams: dict, model: torch.nn.Module) -> Path:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    return path


def test_classification_validation_and_predict_give_identical_tensors(tmp_path: Path) -> None:
    names = _write_awkward_files(tmp_path / "train" / "a")
    _write_awkward_files(tmp_path / "train" / "b")
    _write_awkward_files(tmp_path / "predict")
    dm = ImageFolderDataModule(
        str(tmp_path / "train"),
        val_dir=str(tmp_path / "train"),
        predict_dir=str(tmp_path / "predict"),
        img_size=20,
        crop_pct=0.8,
        interpolation="bicubic",
    )
    dm.setup("fit")
    dm.setup("predict")
    validation = {
        p.name: dm.val_dataset[i]["image"]
        for i, (p, label) in enumerate(dm.val_dataset.samples)
        if label == 0
    }
    train_predict = {
        Path(s["id"]).name: s["image"] for s in (dm.predict_dataset[i] for i in range(len(names)))
    }

    model = timm.create_model("test_vit", num_classes=2, img_size=20, patch_size=4)
    hparams = {"model": "test_vit", "num_classes": 2, "model_kwargs": {"img_size": 20, "patch_size": 4}}
    ckpt = _checkpoint(tmp_path / "c.ckpt", {**hparams, "data_config": dm.data_config}, model)
    loaded = load_model(checkpoint=str(ckpt))
    predicted = _predict_tensors(tmp_path / "predict", loaded.data_config)

    assert sorted(validation) == sorted(train_predict) == sorted(predicted) == names
    for name in names:
        assert validation[name].shape == (3, 20, 20)
        torch.testing.assert_close(train_predict[name], validation[name], rtol=0, atol=0)
        torch.testing.assert_close(predicted[name], validation[name], rtol=0, atol=0)


def test_segmentation_validation_and_predict_give_identical_tensors(tmp_path: Path) -> None:
    names = _write_awkward_files(tmp_path / "val" / "images")
    (tmp_path / "val" / "masks").mkdir()
    for name in names:
        height, width = read_rgb(tmp_path / "val" / "images" / name).shape[:2]  # the displayed size
        mask = np.zeros((height, width), np.uint8)
        Image.fromarray(mask).save(tmp_path / "val" / "masks" / (Path(name).stem + ".png"))
    dm = SegmentationFolderDataModule(
        str(tmp_path / "val"),
        3,
        val_dir=str(tmp_path / "val"),
        predict_dir=str(tmp_path / "val"),
        base_size=22,
    )
    dm.setup("fit")
    dm.setup("predict")
    validation = {p.name: dm.val_dataset[i]["image"] for i, (p, _) in enumerate(dm.val_dataset.pairs)}
    train_predict = {
        Path(s["id"]).name: s["image"] for s in (dm.predict_dataset[i] for i in range(len(names)))
    }

    from vmamba.seg import create_segmentation_model

    kwargs = {"fpn_channels": 8, "channels": 8}
    model = create_segmentation_model("test_resnet", 3, decoder="fpn", **kwargs)
    hparams = {"backbone": "test_resnet", "decoder": "fpn", "num_classes": 3, "decoder_kwargs": kwargs}
    ckpt = _checkpoint(tmp_path / "s.ckpt", {**hparams, "data_config": dm.data_config}, model)
    predicted = _predict_tensors(tmp_path / "val" / "images", load_model(checkpoint=str(ckpt)).data_config)

    assert validation["rotated.jpg"].shape == (3, round(22 * 40 / 24), 22)  # portrait, as displayed
    for name in names:
        torch.testing.assert_close(train_predict[name], validation[name], rtol=0, atol=0)
        torch.testing.assert_close(predicted[name], validation[name], rtol=0, atol=0)


def test_one_list_of_extensions() -> None:
    import vmamba.data.folders as folders

    assert not hasattr(folders, "IMG_EXTENSIONS") and not hasattr(folders, "load_rgb")
    assert ".gif" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS


@pytest.mark.parametrize("mode", ["center", "squash"])
def test_eval_preprocess_matches_a_direct_computation(mode: str) -> None:
    """Centre crop / squash and normalisation computed by hand on an image that needs no resampling."""
    image = _pattern(20, 20)
    cfg = {"task": "classification", "input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3}
    cfg |= {"interpolation": "nearest", "crop_pct": 0.8, "crop_mode": mode}
    out = EvalPreprocess(cfg)(image=image)["image"]
    if mode == "center":
        expected = image[2:18, 2:18]  # 20 / 0.8 -> short side 20 (no resize), centre 16 x 16
    else:
        expected = image[np.arange(16) * 20 // 16][:, np.arange(16) * 20 // 16]
    expected = (torch.from_numpy(expected).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(out, expected)
