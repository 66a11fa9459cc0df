"""Tests for vmamba.predict (``vmamba-predict``) and the robust image reading of vmamba.imageio.

Every test builds its own images and tiny models under ``tmp_path`` and runs ``main([...])`` in-process.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vmamba.imageio import (
    ImageReadError,
    atomic_write,
    find_images,
    load_image,
    read_path_list,
    safe_relative_path,
)
from vmamba.loading import ModelLoadError, load_model
from vmamba.predict import collect_inputs, main
from vmamba.preprocess import EvalPreprocess
from vmamba.writers import segmentation_palette

CLASS_NAMES = ["cat", "dog", "bird"]
CLS_KWARGS = {"img_size": 32}
SEG_CLASSES = 4
GOOD_KEYS = [
    "deep16.png",
    "gray.png",
    "good/a.jpg",
    "good/a.png",
    "palette.gif",
    "rgba.png",
    "rotated.jpg",
    'sub dir/ünï cødé, "q".png',
]
CORRUPT_KEYS = ["corrupt.jpg", "truncated.png"]


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with good, corrupt, grayscale, RGBA, palette, 16-bit, EXIF-rotated and oddly named images."""
    root = tmp_path_factory.mktemp("images")
    (root / "good").mkdir()
    (root / "sub dir").mkdir()
    (root / ".hidden").mkdir()
    Image.fromarray(_rgb(30, 40, 0)).save(root / "good" / "a.jpg", quality=95)
    Image.fromarray(_rgb(36, 36, 1)).save(root / "good" / "a.png")
    Image.fromarray(_rgb(20, 24, 2)[..., 0]).save(root / "gray.png")
    rgba = np.concatenate([_rgb(33, 31, 3), np.full((33, 31, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    Image.fromarray(_rgb(25, 35, 4)).convert("P").save(root / "palette.gif")
    deep = (np.arange(28 * 30, dtype=np.uint16).reshape(28, 30) * 70).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep16.png")  # mode I;16
    rotated = Image.fromarray(_rgb(20, 40, 5))  # stored 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(_rgb(26, 27, 6)).save(root / "sub dir" / 'ünï cødé, "q".png')
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(range(256)))
    full = root / "full.png"
    Image.fromarray(_rgb(32, 32, 7)).save(full)
    (root / "truncated.png").write_bytes(full.read_bytes()[:200])
    full.unlink()
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(_rgb(8, 8, 8)).save(root / ".hidden" / "skip.png")
    return root


def _timm_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=len(CLASS_NAMES), **CLS_KWARGS).eval()


@pytest.fixture(scope="module")
def cls_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint shaped like ClassificationTask's: ``model.*`` weights plus the hyper-parameters contract."""
    model = _timm_classifier()
    path = tmp_path_factory.mktemp("ckpt") / "cls.ckpt"
    hparams = {
        "model": "test_vit",
        "num_classes": len(CLASS_NAMES),
        "class_names": CLASS_NAMES,
        "model_kwargs": CLS_KWARGS,
        "data_config": {
            "task": "classification",
            "input_size": [3, 32, 32],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "crop_pct": 1.0,
            "interpolation": "bilinear",
        },
    }
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 1, "global_step": 10}, path)
    return path


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint shaped like SegmentationTask's, with a tiny test_resnet + FPN network."""
    from vmamba.seg import create_segmentation_model

    torch.manual_seed(0)
    kwargs = {"fpn_channels": 16, "channels": 8}
    model = create_segmentation_model("test_resnet", SEG_CLASSES, decoder="fpn", **kwargs)
    path = tmp_path_factory.mktemp("ckpt") / "seg.ckpt"
    hparams = {
        "backbone": "test_resnet",
        "decoder": "fpn",
        "num_classes": SEG_CLASSES,
        "class_names": [f"c{i}" for i in range(SEG_CLASSES)],
        "backbone_kwargs": {},
        "decoder_kwargs": kwargs,
        "data_config": {
            "task": "segmentation",
            "input_size": [3, 32, 32],
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
        },
    }
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ imageio


def test_load_image_modes(image_dir: Path) -> None:
    for key in GOOD_KEYS:
        image = load_image(image_dir / key)
        assert image.mode == "RGB", key
    assert load_image(image_dir / "rotated.jpg").size == (20, 40)  # EXIF applied: displayed portrait
    gray = np.asarray(load_image(image_dir / "gray.png"))
    assert (gray[..., 0] == gray[..., 2]).all()
    deep = np.asarray(load_image(image_dir / "deep16.png"))[..., 0].astype(np.int64)
    raw = np.arange(28 * 30).reshape(28, 30) * 70
    np.testing.assert_array_equal(deep, np.round(raw * 255 / 65535).astype(np.int64))
    rgba = np.asarray(load_image(image_dir / "rgba.png"))
    np.testing.assert_array_equal(rgba, _rgb(33, 31, 3))  # alpha dropped, colours kept


@pytest.mark.parametrize("name", CORRUPT_KEYS + ["missing.png"])
def test_load_image_errors_name_file(image_dir: Path, name: str) -> None:
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
        load_image(image_dir / name)


def test_find_images_and_lists(image_dir: Path, tmp_path: Path) -> None:
    found = [str(p) for p in find_images(image_dir)]
    assert found == sorted(GOOD_KEYS + CORRUPT_KEYS)  # no .txt, nothing hidden, sorted
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n\n{image_dir / 'gray.png'}\nrel/x.png\n../up.png\nrel/x.png\n")
    entries = read_path_list(listing)
    assert [e for e, _ in entries] == [str(image_dir / "gray.png"), "rel/x.png", "../up.png"]
    assert entries[1][1] == tmp_path / "rel" / "x.png"
    assert str(safe_relative_path("/abs/a.png")) == "abs/a.png"
    assert str(safe_relative_path("../b/./c.png")) == "__/b/c.png"
    with pytest.raises(ValueError):
        safe_relative_path("/")


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.csv"]  # no temp file left
    with atomic_write(target) as handle:
        handle.write("new")
    assert target.read_text() == "new"


# ------------------------------------------------------------------------------------------ classification


def test_classification_csv(image_dir: Path, cls_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(
        [str(image_dir), "--checkpoint", str(cls_ckpt), "--results-dir", str(out), "-j", "0", "--topk", "2"]
    )
    assert rc == 0
    rows = _read_csv(out / "test_vit-32.csv")
    assert [r["filename"] for r in rows] == sorted(GOOD_KEYS)
    assert list(rows[0]) == ["filename", "label_0", "label_1", "prob_0", "prob_1"]
    for row in rows:
        assert {row["label_0"], row["label_1"]} <= set(CLASS_NAMES) and row["label_0"] != row["label_1"]
        assert 1.0 >= float(row["prob_0"]) >= float(row["prob_1"]) >= 0.0
    errors = _read_csv(out / "errors.csv")
    assert [e["filename"] for e in errors] == CORRUPT_KEYS
    assert all(e["error"] for e in errors)
    captured = capsys.readouterr()
    assert "Processed 8 images, skipped 2 (2 failed, 0 already done)" in captured.out
    assert "corrupt.jpg" in captured.err

    # The probabilities are those of the network on the checkpoint's preprocessing.
    cfg = load_model(checkpoint=str(cls_ckpt)).data_config
    x = EvalPreprocess(cfg)(image=np.asarray(load_image(image_dir / "gray.png")))["image"]
    with torch.no_grad():
        probs = _timm_classifier()(x[None]).softmax(-1)[0]
    row = next(r for r in rows if r["filename"] == "gray.png")
    assert row["label_0"] == CLASS_NAMES[int(probs.argmax())]
    assert float(row["prob_0"]) == pytest.approx(float(probs.max()), abs=1e-5)


def test_classification_json_and_index(image_dir: Path, cls_ckpt: Path, tmp_path: Path) -> None:
    args = [str(image_dir), "--checkpoint", str(cls_ckpt), "--results-dir", str(tmp_path), "-j", "0"]
    assert main(args + ["--results-format", "json", "--results-file", "preds.csv", "--include-index"]) == 0
    data = json.loads((tmp_path / "preds.json").read_text(encoding="utf-8"))
    assert list(data) == sorted(GOOD_KEYS)
    for record in data.values():
        assert set(record) == {"index", "label", "prob"}
        assert record["label"] == CLASS_NAMES[record["index"]]
    assert main(args + ["--results-format", "json", "--results-file", "k3", "--topk", "5"]) == 0
    record = json.loads((tmp_path / "k3.json").read_text(encoding="utf-8"))["gray.png"]
    assert len(record["label"]) == len(record["prob"]) == 3  # topk capped at num_classes
    assert main(args + ["--results-format", "json", "--results-file", "k3", "--topk", "3", "--resume"]) == 0
    assert main(args + ["--results-format", "json", "--results-file", "k3", "--topk", "2", "--resume"]) == 2


def test_resume_keeps_rows_and_skips_done(image_dir: Path, cls_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = [str(image_dir), "--checkpoint", str(cls_ckpt), "--results-dir", str(out), "-j", "0", "--resume"]
    results = out / "run.csv"
    out.mkdir()
    results.write_text("filename,label,prob\nold/gone.jpg,dog,0.5\ngray.png,bird,0.25\n", encoding="utf-8")
    assert main(args + ["--results-file", "run"]) == 0
    assert "Processed 7 images, skipped 3 (2 failed, 1 already done)" in capsys.readouterr().out
    rows = {r["filename"]: r for r in _read_csv(results)}
    assert set(rows) == set(GOOD_KEYS) | {"old/gone.jpg"}
    assert rows["gray.png"]["label"] == "bird" and rows["old/gone.jpg"]["prob"] == "0.5"  # earlier rows kept
    assert main(args + ["--results-file", "run"]) == 0  # everything done: still success
    assert "Processed 0 images, skipped 10 (2 failed, 8 already done)" in capsys.readouterr().out
    assert main(args + ["--results-file", "run", "--topk", "2"]) == 2  # other columns: refuse to mix
    assert "columns" in capsys.readouterr().err


def test_path_list_outputs_stay_inside(image_dir: Path, cls_ckpt: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    listing = work / "list.txt"
    listing.write_text(
        f"{image_dir / 'gray.png'}\n../nope.png\n{image_dir / 'corrupt.jpg'}\n", encoding="utf-8"
    )
    out = tmp_path / "out"
    assert main([str(listing), "--checkpoint", str(cls_ckpt), "--results-dir", str(out), "-j", "0"]) == 0
    rows = _read_csv(out / "test_vit-32.csv")
    assert [r["filename"] for r in rows] == [str(image_dir / "gray.png")]  # the name as written round-trips
    errors = {e["filename"]: e["error"] for e in _read_csv(out / "errors.csv")}
    assert set(errors) == {"../nope.png", str(image_dir / "corrupt.jpg")}
    assert "not found" in errors["../nope.png"]


def test_exit_codes(image_dir: Path, cls_ckpt: Path, tmp_path: Path, capsys) -> None:
    bad_only = tmp_path / "bad"
    bad_only.mkdir()
    (bad_only / "x.png").write_bytes(b"garbage")
    assert (
        main([str(bad_only), "--checkpoint", str(cls_ckpt), "--results-dir", str(tmp_path), "-j", "0"]) == 1
    )
    assert "no image could be processed" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--checkpoint", str(cls_ckpt), "--results-dir", str(tmp_path)]) == 1
    assert "no images found" in capsys.readouterr().err
    assert main([str(image_dir), "--checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(image_dir)]) == 2
    assert "no model given" in capsys.readouterr().err


def test_checkpoint_loading_is_safe_and_strict(cls_ckpt: Path, tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": "test_vit"}, "obj": _Payload()}, unsafe)
    _Payload.constructed = 0
    with pytest.raises(ModelLoadError, match="no num_classes"):  # read, with the object as an inert stand-in
        load_model(checkpoint=str(unsafe))
    assert _Payload.constructed == 0  # none of the pickled class's code ran
    ckpt = torch.load(cls_ckpt, weights_only=True)
    ckpt["state_dict"]["model.extra.weight"] = torch.zeros(1)
    ckpt["state_dict"].pop("model.head.bias")
    broken = tmp_path / "broken.ckpt"
    torch.save(ckpt, broken)
    with pytest.raises(ModelLoadError, match=r"(?s)missing keys.*head\.bias.*unexpected keys.*extra\.weight"):
        load_model(checkpoint=str(broken))
    with pytest.raises(ModelLoadError, match="--task segmentation"):
        load_model(checkpoint=str(cls_ckpt), task="seg")


class _Payload:
    """An arbitrary pickled object: weights_only loading must never run its code."""

    constructed = 0

    def __setstate__(self, state: dict) -> None:
        type(self).constructed += 1


def test_model_name_with_weights_and_save_for_hf(image_dir: Path, cls_ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = _timm_classifier()
    weights = tmp_path / "w.safetensors"
    save_file(model.state_dict(), weights)
    loaded = load_model("test_vit", str(weights), model_kwargs=CLS_KWARGS)
    assert loaded.num_classes == 3  # read from the classifier weights, head kept
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))

    export = tmp_path / "hf"
    timm.models.save_for_hf(model, export, model_config={"label_names": CLASS_NAMES}, model_args=CLS_KWARGS)
    out = tmp_path / "out"
    rc = main(
        [
            str(image_dir),
            "-m",
            f"local-dir:{export}",
            "--results-dir",
            str(out),
            "-j",
            "0",
            "--img-size",
            "32",
        ]
    )
    assert rc == 0
    hf_rows = _read_csv(out / "hf-32.csv")
    assert {r["label"] for r in hf_rows} <= set(CLASS_NAMES) and len(hf_rows) == len(GOOD_KEYS)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model("test_vit")


def test_collect_inputs_rejects_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a folder nor a text file"):
        collect_inputs(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- segmentation


def test_segmentation_masks_overlays_resume(image_dir: Path, seg_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "seg out"
    args = [str(image_dir), "--checkpoint", str(seg_ckpt), "--results-dir", str(out), "-j", "0"]
    assert main(args + ["--slide-window", "32", "--slide-stride", "24", "--overlay"]) == 0
    masks = sorted(str(p.relative_to(out / "masks").as_posix()) for p in (out / "masks").rglob("*.png"))
    expected = {key: key.rsplit(".", 1)[0] + ".png" for key in GOOD_KEYS}
    expected["good/a.png"] = "good/a.png.png"  # the name clash: good/a.jpg came first and took good/a.png
    assert masks == sorted(expected.values())
    for key, name in expected.items():
        mask = Image.open(out / "masks" / name)
        assert mask.mode == "L"
        assert mask.size == load_image(image_dir / key).size  # original (displayed) size
        assert np.asarray(mask).max() < SEG_CLASSES
        assert (out / "overlays" / (name[:-4] + ".jpg")).is_file()
    assert [e["filename"] for e in _read_csv(out / "errors.csv")] == CORRUPT_KEYS

    # The mask is the argmax of the sliding-window logits.
    from vmamba.seg.inference import predict_sliding

    loaded = load_model(checkpoint=str(seg_ckpt))
    x = EvalPreprocess(loaded.data_config)(image=np.asarray(load_image(image_dir / "rgba.png")))["image"][
        None
    ]
    reference = predict_sliding(loaded.model, x, 32, 24).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "rgba.png")), reference)

    capsys.readouterr()
    (out / "masks" / "gray.png").unlink()
    assert main(args + ["--crop-size", "32", "--overlay", "--resume"]) == 0  # the old flag names still work
    assert "Processed 1 images, skipped 9 (2 failed, 7 already done)" in capsys.readouterr().out
    assert (out / "masks" / "gray.png").is_file()


def test_segmentation_whole_image_and_base_size(image_dir: Path, seg_ckpt: Path, tmp_path: Path) -> None:
    rc = main(
        [str(image_dir), "--checkpoint", str(seg_ckpt), "--results-dir", str(tmp_path), "--base-size", "16"]
    )
    assert rc == 0
    assert Image.open(tmp_path / "masks" / "rotated.png").size == (20, 40)  # resized back to the original


def test_palette_is_fixed() -> None:
    palette = segmentation_palette(300)
    assert palette.shape == (300, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert len({tuple(c) for c in palette[:256]}) == 256


# ------------------------------------------------------------------------ real vmamba.tasks checkpoints


def _fit_and_save(task, data: DataLoader, path: Path) -> Path:
    """One optimizer step with Lightning, then ``trainer.save_checkpoint`` (the real checkpoint layout)."""
    import lightning as L

    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(task, data)
    trainer.save_checkpoint(path)
    return path


def test_task_checkpoints(image_dir: Path, tmp_path: Path) -> None:
    """Checkpoints written by ClassificationTask (tiny Vim) and SegmentationTask load and predict."""
    pytest.importorskip("lightning")
    from vmamba.seg.inference import predict_sliding
    from vmamba.tasks import ClassificationTask, SegmentationTask

    torch.manual_seed(0)
    vim_kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32}
    data_config = {
        "task": "classification",
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "grayscale": True,
    }
    cls_task = ClassificationTask(
        "vim_tiny_patch16_224", 3, CLASS_NAMES, model_kwargs=vim_kwargs, data_config=data_config
    )
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    cls_data = DataLoader([{"image": images[i], "label": labels[i]} for i in range(2)], batch_size=2)
    cls_ckpt = _fit_and_save(cls_task, cls_data, tmp_path / "c.ckpt")
    loaded = load_model(checkpoint=str(cls_ckpt))
    assert loaded.task == "classification" and loaded.class_names == CLASS_NAMES
    assert loaded.data_config["grayscale"] is True
    out = tmp_path / "cls"
    assert main([str(image_dir), "--checkpoint", str(cls_ckpt), "--results-dir", str(out), "-j", "0"]) == 0
    row = {r["filename"]: r for r in _read_csv(out / "vim_tiny_patch16_224-32.csv")}["good/a.png"]
    x = EvalPreprocess(data_config)(image=np.asarray(load_image(image_dir / "good" / "a.png")))["image"]
    with torch.no_grad():
        probs = cls_task.model.eval()(x[None]).softmax(-1)[0]
    assert float(row["prob"]) == pytest.approx(float(probs.max()), abs=1e-5)

    seg_task = SegmentationTask(
        "test_resnet", "fpn", SEG_CLASSES, decoder_kwargs={"fpn_channels": 16, "channels": 8}, slide_window=24
    )
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, SEG_CLASSES, (2, 32, 32))
    seg_data = DataLoader([{"image": images[i], "mask": masks[i]} for i in range(2)], batch_size=2)
    seg_ckpt = _fit_and_save(seg_task, seg_data, tmp_path / "s.ckpt")
    loaded = load_model(checkpoint=str(seg_ckpt))
    assert loaded.task == "segmentation" and loaded.slide_window == 24 and loaded.slide_stride == 16
    assert loaded.model.aux_head is not None
    out = tmp_path / "seg"
    assert main([str(image_dir), "--checkpoint", str(seg_ckpt), "--results-dir", str(out), "-j", "0"]) == 0
    x = EvalPreprocess(loaded.data_config)(image=np.asarray(load_image(image_dir / "gray.png")))["image"][
        None
    ]
    reference = predict_sliding(seg_task.model.eval(), x, 24, 16).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "gray.png")), reference)
