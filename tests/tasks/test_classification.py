"""ClassificationTask: steps, mixup, freezing, predictions, checkpoint contents, mixed precision."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from vmamba.data import DigitsDataModule, ShapesDataModule
from vmamba.tasks import ClassificationTask

TINY_VIM = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32}


def _task(**kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    args = dict(model="vim_tiny_patch16_224", num_classes=10, model_kwargs=TINY_VIM)
    return ClassificationTask(**(args | kwargs))


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(n, 3, 16, 16), "label": torch.arange(n) % 10}


def test_steps_mixup_and_predict() -> None:
    task = _task(mixup_alpha=0.8, cutmix_alpha=1.0)
    loss = task.training_step(_batch(4), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert task.model.head.weight.grad is not None
    loss = task.training_step(_batch(3), 0)  # odd batch: label smoothing only, no mixup
    assert torch.isfinite(loss)
    probs = task.predict_step(_batch(4), 0)
    assert probs.shape == (4, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_freeze_backbone_trains_only_the_head() -> None:
    task = _task(freeze_backbone=True)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    groups = task.configure_optimizers().param_groups
    assert sum(len(g["params"]) for g in groups) == 2


def test_default_data_config_and_errors() -> None:
    task = _task()
    cfg = task.hparams["data_config"]
    assert cfg["input_size"] == [3, 16, 16] and len(cfg["mean"]) == 3 and isinstance(cfg["mean"], list)
    # The contract's keys only: no hub metadata borrowed from the ImageNet pretrained cfg.
    assert set(cfg) == {
        "task",
        "input_size",
        "mean",
        "std",
        "grayscale",
        "interpolation",
        "crop_pct",
        "crop_mode",
    }
    assert cfg["task"] == "classification"
    with pytest.raises(ValueError, match="segmentation data_config"):
        _task(data_config=ShapesDataModule().data_config)
    with pytest.raises(ValueError, match="missing"):
        _task(data_config={"input_size": [3, 16, 16]})
    with pytest.raises(ValueError, match="Unknown model"):
        ClassificationTask("no_such_model_xyz", num_classes=2)
    with pytest.raises(ValueError, match="class_names"):
        _task(class_names=["a", "b"])


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    source = _task(num_classes=10)
    path = tmp_path / "w.pth"
    torch.save(source.model.state_dict(), path)
    loaded = _task(num_classes=10, weights=str(path))
    for (name, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values()):
        if not name.startswith("head."):  # a different num_classes than the file's would reset the head
            torch.testing.assert_close(a, b)


def test_checkpoint_holds_the_inference_contract(tmp_path: Path) -> None:
    dm = DigitsDataModule(img_size=16, batch_size=8)
    task = _task(class_names=[str(i) for i in range(10)], data_config=dm.data_config)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, dm)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True, map_location="cpu")
    hp = ckpt["hyper_parameters"]
    assert hp["model"] == "vim_tiny_patch16_224" and hp["num_classes"] == 10
    assert hp["model_kwargs"] == TINY_VIM and hp["class_names"][3] == "3"
    assert hp["data_config"] == dm.data_config
    assert hp["data_config"]["input_size"] == [3, 16, 16] and hp["data_config"]["grayscale"] is True
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    restored = ClassificationTask.load_from_checkpoint(tmp_path / "c.ckpt", weights_only=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(restored.eval()(x), task.eval()(x))


def test_bf16_mixed_training_stays_finite(tmp_path: Path) -> None:
    task = _task(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = DigitsDataModule(img_size=16, batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        max_steps=3,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, dm)
    assert torch.isfinite(trainer.callback_metrics["train_loss_step"])
    (metrics,) = trainer.validate(task, dm, verbose=False)
    assert metrics["val_loss"] == metrics["val_loss"] < float("inf")
    assert all(torch.isfinite(p).all() for p in task.parameters())


def test_grad_checkpointing_matches_plain_gradients() -> None:
    plain, ckpt = _task(), _task(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    batch = _batch(2)
    for task in (plain, ckpt):
        task.train()
        task.training_step(batch, 0).backward()
    torch.testing.assert_close(plain.model.head.weight.grad, ckpt.model.head.weight.grad)
    torch.testing.assert_close(
        plain.model.patch_embed.proj.weight.grad, ckpt.model.patch_embed.proj.weight.grad
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_gpu_stays_finite(tmp_path: Path, precision: str) -> None:
    task = _task(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        gradient_clip_val=1.0,
        max_steps=5,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(task, DigitsDataModule(img_size=16, batch_size=32))
    assert torch.isfinite(trainer.callback_metrics["train_loss_step"])
    assert all(torch.isfinite(p).all() for p in task.parameters())
