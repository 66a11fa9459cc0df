"""Semantic segmentation task on :mod:`vmamba.seg`: backbone + decoder (UperNet by default) + auxiliary head.

Loss: cross-entropy with ``ignore_index`` (+ optional soft dice) on the decoder, plus the auxiliary FCN head's
cross-entropy weighted by ``aux_weight`` (0.4 in the UperNet recipes). Metrics: mIoU (mean over classes
present in the targets or predictions, as mmseg) and pixel accuracy. Large validation images can be predicted
with a sliding window.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.optim import AdamW
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from vmamba.contract import segmentation_data_config
from vmamba.seg import create_segmentation_model, predict_sliding
from vmamba.tasks.base import BaseTask

__all__ = ["SegmentationTask", "dice_loss"]


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, eps: float = 1.0
) -> torch.Tensor:
    """Soft multi-class dice loss ``1 - mean_c dice_c`` over the pixels whose target is not ``ignore_index``.

    Args:
        logits: ``(N, K, H, W)`` scores.
        target: ``(N, H, W)`` class indices.
        ignore_index: target value to leave out.
        eps: smoothing added to numerator and denominator (keeps absent classes at dice 1).
    """
    valid = target != ignore_index
    probs = logits.float().softmax(dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(torch.where(valid, target, 0), logits.shape[1]).permute(0, 3, 1, 2).float()
    onehot = onehot * valid.unsqueeze(1)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


class SegmentationTask(BaseTask):
    """Train and evaluate a semantic segmentation model.

    The network is ``self.model``, a :class:`vmamba.seg.SegmentationModel` from
    :func:`vmamba.seg.create_segmentation_model`. The checkpoint's ``hyper_parameters`` hold ``backbone``,
    ``decoder``, ``num_classes``, ``class_names``, ``backbone_kwargs``, ``decoder_kwargs``, ``aux_head``,
    ``ignore_index`` and ``data_config`` (``input_size`` = training crop, ``mean``, ``std``, ``base_size``,
    ``ignore_index``, ``palette``), enough to rebuild and run the model without this class.

    Args:
        backbone: timm backbone name (``vmamba_tiny_s1l8``, ``vim_tiny_patch16_224``, ``resnet18``...).
        decoder: ``"upernet"``, ``"fpn"``, ``"conv"`` or ``"linear"``.
        num_classes: number of classes (linked from the data module by the CLI).
        class_names: class names in index order.
        ignore_index: target value excluded from losses and metrics (linked from the data module).
        pretrained: load the backbone's official weights through timm.
        weights: local backbone weights file (converted by the model's checkpoint filter).
        backbone_kwargs: extra ``timm.create_model`` kwargs of the backbone (``drop_path_rate``,
            ``img_size``...).
        decoder_kwargs: decoder kwargs (``channels``, ``pool_scales``, ``dropout``...).
        aux_head: add the auxiliary FCN head (trained with ``aux_weight``, unused at inference).
        aux_weight: weight of the auxiliary loss.
        dice_weight: weight of an extra soft-dice loss on the decoder output (0 disables it).
        class_weights: per-class cross-entropy weights.
        slide_window: window side for sliding-window validation/test/predict (``None``: whole image).
        slide_stride: window step (default two thirds of the window, as Vim's 512/341).
        freeze_backbone: train only neck, decoder and auxiliary head.
        grad_checkpointing: recompute backbone blocks in the backward pass.
        data_config: evaluation preprocessing stored for inference (linked from the data module by the CLI).
        optimizer, lr_scheduler, lr_scheduler_interval, layer_decay, no_weight_decay: see :class:`BaseTask`.
    """

    monitor = "val_miou"
    mode = "max"
    task = "segmentation"
    target_key = "mask"

    def __init__(
        self,
        backbone: str = "vmamba_tiny_s1l8",
        decoder: str = "upernet",
        num_classes: int = 150,
        class_names: list[str] | None = None,
        ignore_index: int = 255,
        pretrained: bool = False,
        weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        decoder_kwargs: dict[str, Any] | None = None,
        aux_head: bool = True,
        aux_weight: float = 0.4,
        dice_weight: float = 0.0,
        class_weights: list[float] | None = None,
        slide_window: int | None = None,
        slide_stride: int | None = None,
        freeze_backbone: bool = False,
        grad_checkpointing: bool = False,
        data_config: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        layer_decay: float | None = None,
        no_weight_decay: list[str] | None = None,
    ) -> None:
        self.check_per_class("class_weights", class_weights, num_classes)
        super().__init__(
            num_classes,
            class_names,
            data_config,
            freeze_backbone,
            grad_checkpointing,
            optimizer,
            lr_scheduler,
            lr_scheduler_interval,
            layer_decay,
            no_weight_decay,
        )
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.slide_window = slide_window
        self.slide_stride = slide_stride or (max(1, slide_window * 2 // 3) if slide_window else None)
        self.hparams["slide_stride"] = self.slide_stride
        self.register_buffer(
            "class_weights",
            torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None,
            persistent=False,
        )

    def configure_model(self) -> nn.Module:
        """The :func:`vmamba.seg.create_segmentation_model` network (backbone weights from ``weights``)."""
        hp = self.hparams
        kwargs = dict(hp.backbone_kwargs or {})
        if hp.weights is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=hp.weights)
        return create_segmentation_model(
            hp.backbone,
            hp.num_classes,
            decoder=hp.decoder,
            pretrained=hp.pretrained or hp.weights is not None,
            backbone_kwargs=kwargs,
            aux_head=hp.aux_head,
            aux_weight=hp.aux_weight,
            **dict(hp.decoder_kwargs or {}),
        )

    def default_data_config(self) -> dict[str, Any]:
        """The backbone's normalisation, the sliding window (else 512) as the crop, no resize."""
        cfg = self.model.pretrained_cfg
        window = self.hparams.slide_window or 512
        return segmentation_data_config(
            window,
            cfg.get("mean", IMAGENET_DEFAULT_MEAN),
            cfg.get("std", IMAGENET_DEFAULT_STD),
            ignore_index=self.hparams.ignore_index,
        )

    def configure_metrics(self) -> MetricCollection:
        """mIoU (mean over classes present in targets or predictions) and pixel accuracy."""
        n, ignore = self.num_classes, self.hparams.ignore_index
        return MetricCollection(
            {
                "miou": MulticlassJaccardIndex(n, average="macro", ignore_index=ignore),
                "pixel_acc": MulticlassAccuracy(n, average="micro", ignore_index=ignore),
            }
        )

    def setup(self, stage: str) -> None:
        """Check that the data module pads and ignores with the same ``ignore_index`` as the loss."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_ignore = getattr(datamodule, "ignore_index", self.ignore_index)
        if data_ignore != self.ignore_index:
            raise ValueError(
                f"The data module uses ignore_index={data_ignore} but the task "
                f"ignore_index={self.ignore_index}; "
                "set the same value in both."
            )

    def freeze_backbone(self) -> None:
        """Freeze the backbone; neck, decoder and auxiliary head stay trainable."""
        for p in self.model.backbone.parameters():
            p.requires_grad = False

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self._ce(logits, target)
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * dice_loss(logits, target, self.ignore_index)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Decoder loss (cross-entropy + optional dice) plus the weighted auxiliary cross-entropy."""
        x, y = batch["image"], batch["mask"]
        logits, aux = self.model.forward_with_aux(x)
        loss = self._loss(logits, y)
        if aux is not None:
            aux_loss = self._ce(aux, y)
            loss = loss + self.model.aux_weight * aux_loss
            self.log("train_aux_loss", aux_loss, on_step=False, on_epoch=True, batch_size=len(x))
        self.check_finite(loss)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        self.train_metrics.update(logits.detach().argmax(dim=1), y)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size, by sliding window when ``slide_window`` is set, else in one pass."""
        if self.slide_window is not None:
            return predict_sliding(
                self.model, x, self.slide_window, self.slide_stride, num_classes=self.num_classes
            )
        return self.model(x)

    def eval_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of the decoder output (cross-entropy + optional dice)."""
        return self._loss(logits, target)

    def metric_input(self, logits: torch.Tensor) -> torch.Tensor:
        """Class indices per pixel."""
        return logits.argmax(dim=1)
