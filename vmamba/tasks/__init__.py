"""vmamba.tasks: Lightning modules for classification and segmentation, schedules and a prediction writer.

``ClassificationTask`` wraps any timm classifier, ``SegmentationTask`` a :mod:`vmamba.seg` model. Both take
the optimizer and scheduler as callables and build parameter groups themselves (no weight decay on norms,
biases, embeddings and the SSM's A/D; optional layer-wise lr decay). See docs/training.md.
"""

from vmamba.tasks.base import BaseTask, layer_ids, no_weight_decay_names, param_groups
from vmamba.tasks.classification import ClassificationTask
from vmamba.tasks.schedulers import WarmupCosineLR, WarmupPolyLR, WarmupSchedule
from vmamba.tasks.segmentation import SegmentationTask, dice_loss
from vmamba.tasks.writers import PredictionWriter

__all__ = [
    "BaseTask",
    "ClassificationTask",
    "PredictionWriter",
    "SegmentationTask",
    "WarmupCosineLR",
    "WarmupPolyLR",
    "WarmupSchedule",
    "dice_loss",
    "layer_ids",
    "no_weight_decay_names",
    "param_groups",
]
