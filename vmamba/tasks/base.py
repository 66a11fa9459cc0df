"""Shared base of the Lightning tasks: shared arguments, hooks and the one eval step; optimizer/scheduler callables with parameter groups (no weight decay on
norms, biases, embeddings and the SSM's A/D; layer-wise lr decay), backbone freezing, gradient checkpointing.

The optimizer and scheduler are *callables* given to the task (typed ``OptimizerCallable`` /
``LRSchedulerCallable``, so the Lightning CLI builds them from YAML), and the parameter groups are built
inside :meth:`BaseTask.configure_optimizers`. The CLI's own ``--optimizer`` would pass ``model.parameters()``
and lose the groups; ``vmamba.cli`` disables it.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.models import group_parameters
from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MetricCollection

from vmamba.contract import check_data_config
from vmamba.tasks.schedulers import WarmupSchedule

__all__ = ["BaseTask", "layer_ids", "no_weight_decay_names", "param_groups", "to_yaml_primitive"]


def to_yaml_primitive(value: Any) -> Any:
    """Convert tuples (recursively) to lists and numpy/torch scalars to Python numbers, so hyper-parameters
    serialise to plain YAML and load with ``torch.load(weights_only=True)``."""
    if isinstance(value, dict):
        return {str(k): to_yaml_primitive(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_yaml_primitive(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names (relative to ``model``) reported by every submodule's timm-style ``no_weight_decay()``,
    plus parameters flagged ``_no_weight_decay`` (the mamba_ssm convention for ``A_log``/``D``)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn) and not isinstance(module, torch.jit.ScriptModule):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    names |= {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    return names


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer index of every parameter for layer-wise lr decay, and the number of layers.

    The first (outermost) submodule with a timm ``group_matcher`` defines the layers (stem = 0, blocks in
    order, final norm last); parameters outside it (a classifier head, a segmentation decoder) get the top
    layer.
    """
    for prefix, module in model.named_modules():
        if callable(getattr(module, "group_matcher", None)):
            inner = group_parameters(module, module.group_matcher(coarse=False), reverse=True)
            mapping = {f"{prefix}.{n}" if prefix else n: i for n, i in inner.items()}
            top = max(mapping.values()) + 1 if mapping else 0
            # Everything the matcher does not cover (head, decoder) trains at the full rate: one layer above.
            has_rest = any(n not in mapping for n, _ in model.named_parameters())
            return mapping, top + (1 if has_rest else 0)
    raise ValueError(
        f"layer_decay needs a model with a timm-style group_matcher(); {type(model).__name__} has none. "
        "Set layer_decay: null."
    )


def param_groups(
    model: nn.Module, layer_decay: float | None = None, no_weight_decay: Iterable[str] = ()
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters of ``model``.

    Parameters with ``ndim <= 1`` (norm weights, biases, ``D``), names ending in ``.bias``, names in the
    model's ``no_weight_decay()`` (position embeddings, class token, ``A_log``) and names matching the extra
    ``no_weight_decay`` patterns (fnmatch) get ``weight_decay=0``; the other groups inherit the optimizer's
    weight decay. With ``layer_decay`` every group gets ``lr_scale = layer_decay ** (num_layers - 1 -
    layer)``, which :meth:`BaseTask.configure_optimizers` multiplies into the group's lr.
    """
    skip = no_weight_decay_names(model)
    patterns = list(no_weight_decay)
    mapping, num_layers = layer_ids(model) if layer_decay is not None else ({}, 1)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (
            param.ndim <= 1
            or name.endswith(".bias")
            or name in skip
            or any(fnmatch.fnmatch(name, p) for p in patterns)
        )
        layer = mapping.get(name, num_layers - 1)
        key = (layer, no_decay)
        if key not in groups:
            group: dict[str, Any] = {
                "params": [],
                "name": f"layer{layer}_{'no_decay' if no_decay else 'decay'}",
            }
            if no_decay:
                group["weight_decay"] = 0.0
            if layer_decay is not None:
                group["lr_scale"] = layer_decay ** (num_layers - 1 - layer)
            groups[key] = group
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("The model has no trainable parameters (is everything frozen?).")
    return [groups[k] for k in sorted(groups)]


class BaseTask(L.LightningModule, ABC):
    """Base of :class:`~vmamba.tasks.ClassificationTask` and :class:`~vmamba.tasks.SegmentationTask`, after
    TorchGeo's ``BaseTask``: it takes the arguments every task shares, saves the hyper-parameters, and calls
    the hooks a subclass fills in, in this order:

    * :meth:`configure_model` returns the network (``self.model``; state-dict keys ``model.*``);
    * :meth:`default_data_config` gives the ``data_config`` when the data module did not link one;
    * :meth:`configure_metrics` returns a ``MetricCollection``, cloned as ``train_``/``val_``/``test_``;
    * :meth:`eval_logits`, :meth:`eval_loss` and :meth:`metric_input` define the one validation/test step
      (:meth:`validation_step`, :meth:`test_step`) and :meth:`predict_step` (softmax over classes).

    Subclasses write only their ``training_step`` and what differs. ``monitor``/``mode`` name the metric that
    ``ReduceLROnPlateau`` and the configs' ``ModelCheckpoint`` watch.

    Args:
        num_classes: number of classes (the CLI links it from the data module).
        class_names: class names in index order (linked from the data module when it knows them).
        data_config: evaluation preprocessing stored for inference (:mod:`vmamba.contract`; linked from the
            data module by the CLI).
        freeze_backbone: train only what :meth:`freeze_backbone` leaves trainable.
        grad_checkpointing: recompute blocks in the backward pass.
        optimizer: callable mapping parameter groups to an optimizer, e.g. YAML
            ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-3, weight_decay: 0.05}}``.
        lr_scheduler: callable mapping the optimizer to a scheduler (``None``: constant lr), e.g.
            ``vmamba.tasks.WarmupCosineLR``; its unset length is filled in from the trainer.
        lr_scheduler_interval: ``"step"`` or ``"epoch"``: when a non-vmamba scheduler steps (vmamba's
            warmup schedules always step per optimizer step).
        layer_decay: layer-wise lr decay factor (e.g. 0.75 for fine-tuning), ``None`` to disable.
        no_weight_decay: extra fnmatch patterns of parameter names trained without weight decay.
    """

    monitor: ClassVar[str] = "val_loss"
    mode: ClassVar[str] = "min"
    #: ``"classification"`` or ``"segmentation"`` (:data:`vmamba.contract.TASKS`).
    task: ClassVar[str] = ""
    #: The batch key of the targets (``"label"`` or ``"mask"``).
    target_key: ClassVar[str] = "label"

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        data_config: dict[str, Any] | None = None,
        freeze_backbone: bool = False,
        grad_checkpointing: bool = False,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        layer_decay: float | None = None,
        no_weight_decay: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.check_per_class("class_names", class_names, num_classes)
        self.num_classes = num_classes
        self.optimizer_fn = optimizer
        self.lr_scheduler_fn = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.layer_decay = layer_decay
        self.extra_no_weight_decay = list(no_weight_decay or [])
        self.model = self.configure_model()
        if freeze_backbone:
            self.freeze_backbone()
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        config = data_config if data_config is not None else self.default_data_config()
        config = check_data_config({"task": self.task, **config})
        if config["task"] != self.task:
            raise ValueError(
                f"{type(self).__name__} got a {config['task']} data_config; use a {self.task} data module"
            )
        self.hparams["data_config"] = to_yaml_primitive(config)
        metrics = self.configure_metrics()
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    @staticmethod
    def check_per_class(name: str, values: list[Any] | None, num_classes: int) -> None:
        """Reject a per-class list argument (``class_names``, ``class_weights``) whose length is not
        ``num_classes``; ``None`` passes."""
        if values is not None and len(values) != num_classes:
            raise ValueError(f"{name} has {len(values)} entries but num_classes is {num_classes}.")

    @abstractmethod
    def configure_model(self) -> nn.Module:
        """Build the network from ``self.hparams``."""

    @abstractmethod
    def default_data_config(self) -> dict[str, Any]:
        """The ``data_config`` to store when none was given (:mod:`vmamba.contract`)."""

    @abstractmethod
    def configure_metrics(self) -> MetricCollection:
        """The metrics of one split, unprefixed (``acc``, ``miou``...)."""

    @abstractmethod
    def freeze_backbone(self) -> None:
        """Set ``requires_grad=False`` on the feature extractor."""

    @abstractmethod
    def eval_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss logged in validation and test."""

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits used by validation, test and prediction (the plain forward pass by default)."""
        return self(x)

    def metric_input(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics are updated with (the logits by default)."""
        return logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch gradient checkpointing of the (outermost) submodule that supports it."""
        for _, module in self.model.named_modules():
            if callable(getattr(module, "set_grad_checkpointing", None)):
                module.set_grad_checkpointing(enable)
                return
        raise ValueError(f"{type(self.model).__name__} does not support gradient checkpointing.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits."""
        return self.model(x)

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection, prefix: str) -> None:
        """Loss and metrics of one validation or test batch, logged per epoch as ``{prefix}_*``."""
        x, y = batch["image"], batch[self.target_key]
        logits = self.eval_logits(x)
        loss = self.eval_loss(logits, y)
        self.log(f"{prefix}_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        metrics.update(self.metric_input(logits), y)
        self.log_dict(metrics, on_epoch=True, prog_bar=prefix == "val", batch_size=len(x))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Loss and metrics, logged per epoch as ``val_*``."""
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """As validation, logged as ``test_*``."""
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities: ``(B, num_classes)`` or ``(B, num_classes, H, W)``."""
        x = batch["image"] if isinstance(batch, dict) else batch
        return self.eval_logits(x).softmax(dim=1)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop with an actionable message on a NaN/inf training loss instead of silently training on it."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss is {loss.item()} at step {self.global_step}. Try a lower lr, gradient "
                "clipping (trainer.gradient_clip_val), a longer warmup, or precision 32-true / bf16-mixed "
                "instead of 16-mixed."
            )

    def _steps_per_epoch(self, total: int) -> float:
        """Optimizer steps per training epoch, from the trainer (after it has sized the training data)."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if math.isinf(batches) or batches <= 0:
            return float(total)
        return math.ceil(batches / max(trainer.accumulate_grad_batches, 1))

    def configure_optimizers(self) -> Any:
        """Optimizer over :func:`param_groups` (layer-decay scales applied to the group lrs) and the
        scheduler."""
        groups = param_groups(self.model, self.layer_decay, self.extra_no_weight_decay)
        optimizer = self.optimizer_fn(groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        if self.lr_scheduler_fn is None:
            return optimizer
        scheduler = self.lr_scheduler_fn(optimizer)
        interval = self.lr_scheduler_interval
        if isinstance(scheduler, WarmupSchedule):
            interval = "step"
            if not scheduler.resolved:
                total = int(self.trainer.estimated_stepping_batches)
                scheduler.resolve(total, self._steps_per_epoch(total))
        config: dict[str, Any] = {"scheduler": scheduler, "interval": interval}
        if isinstance(scheduler, ReduceLROnPlateau):
            config |= {"monitor": self.monitor, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": config}
