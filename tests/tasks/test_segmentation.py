"""SegmentationTask: losses (CE + aux + dice, ignore_index), sliding-window evaluation, metrics,
checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from vmamba.data import ShapesDataModule
from vmamba.tasks import SegmentationTask, dice_loss

TINY = {"depths": [1, 1, 1, 1], "dims": 16}


def _task(**kwargs) -> SegmentationTask:
    torch.manual_seed(0)
    args = dict(
        backbone="vmamba_tiny_s1l8", num_classes=4, backbone_kwargs=TINY, decoder_kwargs={"channels": 16}
    )
    return SegmentationTask(**(args | kwargs))


def _batch(n: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    mask = torch.randint(0, 4, (n, size, size))
    mask[:, :4] = 255
    return {"image": torch.randn(n, 3, size, size), "mask": mask}


def test_training_step_uses_aux_and_dice() -> None:
    task = _task(dice_weight=0.5).eval()  # eval: no dropout, so the loss can be recomputed exactly
    batch = _batch()
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert task.model.aux_head is not None
    assert any(p.grad is not None for p in task.model.aux_head.parameters())
    logits, aux = task.model.forward_with_aux(batch["image"])
    expected = (
        torch.nn.functional.cross_entropy(logits, batch["mask"], ignore_index=255)
        + 0.5 * dice_loss(logits, batch["mask"])
        + 0.4 * torch.nn.functional.cross_entropy(aux, batch["mask"], ignore_index=255)
    )
    torch.testing.assert_close(loss, expected)


def test_dice_loss_ignores_pixels_and_is_zero_when_perfect() -> None:
    target = torch.tensor([[[0, 1], [2, 255]]])
    perfect = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 100
    assert dice_loss(perfect, target, eps=1e-6) < 1e-3
    wrong = perfect.roll(1, dims=1)
    assert dice_loss(wrong, target, eps=1e-6) > 0.9


def test_sliding_window_matches_whole_image_prediction_shape() -> None:
    task = _task(slide_window=32, slide_stride=16).eval()
    x = torch.randn(1, 3, 48, 80)
    probs = task.predict_step({"image": x}, 0)
    assert probs.shape == (1, 4, 48, 80)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 48, 80))


def test_fit_validate_metrics_and_checkpoint(tmp_path: Path) -> None:
    task = _task(class_names=["bg", "c", "s", "t"], slide_window=32)
    dm = ShapesDataModule(num_train=8, num_val=2, img_size=32, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, dm)
    metrics = trainer.callback_metrics
    assert 0 <= metrics["val_miou"] <= 1 and 0 <= metrics["val_pixel_acc"] <= 1
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    hp = torch.load(tmp_path / "s.ckpt", weights_only=True, map_location="cpu")["hyper_parameters"]
    assert hp["backbone"] == "vmamba_tiny_s1l8" and hp["decoder"] == "upernet" and hp["num_classes"] == 4
    assert hp["backbone_kwargs"] == TINY and hp["decoder_kwargs"] == {"channels": 16}
    assert hp["data_config"]["input_size"] == [3, 32, 32]


def test_ignore_index_mismatch_is_reported(tmp_path: Path) -> None:
    task = _task(ignore_index=254)
    dm = ShapesDataModule(num_train=4, num_val=2, img_size=32, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="ignore_index"):
        trainer.fit(task, dm)


def test_miou_ignores_absent_classes_and_ignore_index() -> None:
    task = _task()
    preds = torch.tensor([[[0, 1], [1, 1]]])
    target = torch.tensor([[[0, 1], [255, 1]]])
    task.val_metrics.update(preds, target)
    out = task.val_metrics.compute()
    assert out["val_miou"] == pytest.approx(1.0)  # classes 2 and 3 absent everywhere: not averaged in
    assert out["val_pixel_acc"] == pytest.approx(1.0)
