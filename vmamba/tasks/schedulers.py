"""Per-step learning-rate schedules with linear warmup: cosine (the DeiT/Swin ImageNet recipes) and poly
(the mmseg ADE20K recipe).

Both are ``torch.optim.lr_scheduler.LambdaLR`` subclasses: they multiply each parameter group's initial lr
(layer-wise decay included), so they work with any parameter grouping. The total number of steps is usually
unknown when the YAML is written: leave ``total_steps`` unset and the task fills it in from the trainer
(``trainer.estimated_stepping_batches``, i.e. ``max_epochs`` or ``max_steps``), together with the steps per
epoch that ``warmup_epochs`` needs. In YAML:

    lr_scheduler:
      class_path: vmamba.tasks.WarmupCosineLR
      init_args: {warmup_epochs: 5, min_lr_ratio: 0.01}
"""

from __future__ import annotations

import math

from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosineLR", "WarmupPolyLR", "WarmupSchedule"]


class WarmupSchedule(LambdaLR):
    """Linear warmup from ``warmup_start_ratio`` to 1, then :meth:`decay` down to ``min_lr_ratio``.

    Args:
        optimizer: wrapped optimizer.
        total_steps: total optimizer steps; ``None`` until :meth:`resolve` sets it (the tasks call it).
        warmup_steps: warmup length in steps.
        warmup_epochs: warmup length in epochs (converted with the steps per epoch; added to
        ``warmup_steps``).
        warmup_start_ratio: lr multiplier at step 0.
        min_lr_ratio: lr multiplier at the end of the schedule.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        warmup_epochs: float = 0.0,
        warmup_start_ratio: float = 1e-3,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if warmup_steps < 0 or warmup_epochs < 0:
            raise ValueError("warmup_steps and warmup_epochs must be >= 0.")
        if not 0 <= min_lr_ratio <= 1 or not 0 <= warmup_start_ratio <= 1:
            raise ValueError("min_lr_ratio and warmup_start_ratio must be in [0, 1].")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.warmup_start_ratio = warmup_start_ratio
        self.min_lr_ratio = min_lr_ratio
        self._warmup_total = warmup_steps if warmup_epochs == 0 else None
        super().__init__(optimizer, self.factor)

    @property
    def resolved(self) -> bool:
        """Whether the total length (and the epoch-based warmup) are known."""
        return self.total_steps is not None and self._warmup_total is not None

    def resolve(self, total_steps: int, steps_per_epoch: float) -> None:
        """Fill in the schedule length from the trainer (leaves an explicit ``total_steps`` alone)."""
        if self.total_steps is None:
            self.total_steps = int(total_steps)
        self._warmup_total = self.warmup_steps + int(round(self.warmup_epochs * steps_per_epoch))
        if self._warmup_total >= self.total_steps:
            rank_zero_warn(
                f"Warmup ({self._warmup_total} steps) is not shorter than the whole schedule "
                f"({self.total_steps} steps, e.g. under fast_dev_run or limit_train_batches): warming up "
                "over the whole run instead."
            )
            self._warmup_total = self.total_steps
        # Re-apply the factor of the current step now that the lengths are known.
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def decay(self, progress: float) -> float:
        """Multiplier after warmup as a function of progress in [0, 1]; 1 at 0, 0 at 1 (rescaled to
        ``min_lr_ratio``)."""
        raise NotImplementedError

    def factor(self, step: int) -> float:
        """The lr multiplier at optimizer step ``step``."""
        warmup = self._warmup_total or 0
        if step < warmup:
            return self.warmup_start_ratio + (1 - self.warmup_start_ratio) * step / warmup
        if self.total_steps is None:
            return 1.0
        progress = min(max((step - warmup) / max(self.total_steps - warmup, 1), 0.0), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * self.decay(progress)


class WarmupCosineLR(WarmupSchedule):
    """Linear warmup, then half-cosine decay to ``min_lr_ratio`` (timm's ``cosine`` scheduler, per step)."""

    def decay(self, progress: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * progress))


class WarmupPolyLR(WarmupSchedule):
    """Linear warmup, then polynomial decay ``(1 - progress) ** power`` (mmseg's ``PolyLR``; power 1 =
    linear).

    Args:
        power: exponent of the decay.
        optimizer, total_steps, warmup_steps, warmup_epochs, warmup_start_ratio, min_lr_ratio: see
            :class:`WarmupSchedule`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        warmup_epochs: float = 0.0,
        warmup_start_ratio: float = 1e-6,
        min_lr_ratio: float = 0.0,
        power: float = 1.0,
    ) -> None:
        self.power = power
        super().__init__(
            optimizer, total_steps, warmup_steps, warmup_epochs, warmup_start_ratio, min_lr_ratio
        )

    def decay(self, progress: float) -> float:
        return (1 - progress) ** self.power
