"""Image classification task: any timm model (``vim_*``, ``vmamba_*``, ``vssd_*`` included) trained with Lightning.

Recipe features: label smoothing, mixup/cutmix (timm's ``Mixup``), AdamW without weight decay on norms,
biases, embeddings and the SSM's A/D, layer-wise lr decay, warmup + cosine, backbone freezing, top-1/top-5
accuracy.
"""

from __future__ import annotations

from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import Mixup, resolve_model_data_config
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.optim import AdamW
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

import vmamba.models  # noqa: F401  (registers vim_* / vmamba_* / vssd_* with timm)
from vmamba.contract import classification_data_config
from vmamba.preprocess import CROP_MODES
from vmamba.tasks.base import BaseTask

__all__ = ["ClassificationTask"]


class ClassificationTask(BaseTask):
    """Train, fine-tune and evaluate a timm image classifier.

    The network is ``self.model`` (state-dict keys ``model.*``). The checkpoint's ``hyper_parameters`` carry
    everything needed to rebuild it without this class: ``model``, ``num_classes``, ``model_kwargs``
    (plus ``drop_path_rate``), ``class_names`` and ``data_config`` (evaluation preprocessing: ``input_size``,
    ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``, ``grayscale``).

    Args:
        model: timm model name (``vim_tiny_patch16_224``, ``vmamba_tiny_s1l8``, ``resnet18``, ...).
        num_classes: number of classes (the CLI links it from the data module).
        class_names: class names in index order (linked from the data module when it knows them).
        pretrained: load the model's official weights through timm (needs the hub cache or a download).
        weights: local weights file (timm/official layout, converted by the model's checkpoint filter); the
            classifier is re-initialised when its size differs from ``num_classes``.
        model_kwargs: extra ``timm.create_model`` kwargs (``img_size``, ``patch_size``, ``depth``,
            ``embed_dim``, ``in_chans``, ...).
        drop_path_rate: stochastic depth rate (``None`` keeps the model's default).
        label_smoothing: label smoothing of the training cross-entropy (also applied inside mixup).
        mixup_alpha: mixup alpha (0 disables); DeiT/Swin recipes use 0.8.
        cutmix_alpha: cutmix alpha (0 disables); the recipes use 1.0.
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are enabled.
        freeze_backbone: train only the classifier (``get_classifier()``).
        grad_checkpointing: recompute blocks in the backward pass.
        data_config: evaluation preprocessing stored for inference (the CLI links it from the data module;
            ``None`` resolves timm's data config of the model).
        optimizer, lr_scheduler, lr_scheduler_interval, layer_decay, no_weight_decay: see :class:`BaseTask`.
    """

    monitor = "val_acc"
    mode = "max"
    task = "classification"

    def __init__(
        self,
        model: str = "vim_tiny_patch16_224",
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        drop_path_rate: float | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        freeze_backbone: bool = False,
        grad_checkpointing: bool = False,
        data_config: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        layer_decay: float | None = None,
        no_weight_decay: list[str] | None = None,
    ) -> None:
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
        self.label_smoothing = label_smoothing
        self.train_criterion = SoftTargetCrossEntropy()
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )

    def configure_model(self) -> nn.Module:
        """``timm.create_model`` with official or local weights (through the model's checkpoint filter)."""
        hp = self.hparams
        kwargs = dict(hp.model_kwargs or {})
        if hp.drop_path_rate is not None:
            kwargs["drop_path_rate"] = hp.drop_path_rate
        if hp.weights is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=hp.weights)
        try:
            return timm.create_model(
                hp.model,
                pretrained=hp.pretrained or hp.weights is not None,
                num_classes=hp.num_classes,
                **kwargs,
            )
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(
                    f"Unknown model {hp.model!r}. Use a timm model name; vmamba's are "
                    f"{timm.list_models('vim_*') + timm.list_models('vmamba_*') + timm.list_models('vssd_*')}."
                ) from err
            raise

    def default_data_config(self) -> dict[str, Any]:
        """timm's data config of the model (its own normalisation and crop), at the size it was built for."""
        cfg = resolve_model_data_config(self.model)
        size = cfg["input_size"][-2:]
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            size = img_size
        crop_mode = cfg.get("crop_mode") if cfg.get("crop_mode") in CROP_MODES else "center"
        return classification_data_config(
            size, cfg["mean"], cfg["std"], cfg["interpolation"], cfg["crop_pct"], crop_mode
        )

    def configure_metrics(self) -> MetricCollection:
        """Top-1 accuracy (``acc``), and top-5 (``acc5``) beyond 5 classes."""
        metrics = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
        if self.num_classes > 5:
            metrics["acc5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
        return MetricCollection(metrics)

    def eval_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy without smoothing."""
        return F.cross_entropy(logits, target)

    def freeze_backbone(self) -> None:
        """Freeze everything except the classifier."""
        head = {id(p) for p in self.model.get_classifier().parameters()}
        for p in self.model.parameters():
            p.requires_grad = id(p) in head

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy with label smoothing, on mixup/cutmix-mixed batches when enabled."""
        x, y = batch["image"], batch["label"]
        if self.mixup is not None and len(x) % 2 == 0:
            x, soft = self.mixup(x, y)
            mixed = True
        else:  # mixup needs an even batch; an odd one only gets label smoothing
            soft = F.one_hot(y, self.num_classes).float() * (1 - self.label_smoothing)
            soft += self.label_smoothing / self.num_classes
            mixed = False
        logits = self(x)
        loss = self.train_criterion(logits, soft)
        self.check_finite(loss)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        if not mixed:  # accuracy against mixed targets is meaningless
            self.train_metrics.update(logits.detach(), y)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(x))
        return loss
