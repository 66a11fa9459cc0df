"""Shared base of the vmamba data modules: loaders with per-worker augmentation seeds, and the metadata
(``num_classes``, ``class_names``, ``data_config``) that the Lightning CLI links into the task.

Batches are dictionaries: ``{"image": (B, 3, H, W) float, "label": (B,) long}`` for classification,
``{"image", "mask": (B, H, W) long}`` for segmentation and ``{"image", "id": list[str]}`` for prediction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vmamba.data.transforms import seed_transform, seed_worker

__all__ = ["BaseDataModule", "split_indices"]


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``round(n_c * val_fraction)`` samples of every class go to validation.

    Returns sorted ``(train_indices, val_indices)``. A class with a single sample stays in training.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


class BaseDataModule(L.LightningDataModule, ABC):
    """Base class of the classification and segmentation data modules.

    Subclasses create ``self.train_dataset``, ``self.val_dataset``, ``self.test_dataset`` and
    ``self.predict_dataset`` in :meth:`setup` and implement the three metadata properties. The properties must
    not need :meth:`setup`: the CLI reads them right after instantiation to build the task.

    Args:
        batch_size: training batch size (per device).
        eval_batch_size: batch size of validation, test and prediction loaders; ``None`` uses ``batch_size``.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster transfers to a GPU.
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
    """

    #: ``"classification"`` or ``"segmentation"``; stored in ``data_config`` for the predictor.
    task: ClassVar[str] = ""

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes (linked to ``model.init_args.num_classes`` by the CLI)."""

    @property
    def class_names(self) -> list[str] | None:
        """Class names in index order, or ``None`` when unknown."""
        return None

    @property
    @abstractmethod
    def data_config(self) -> dict[str, Any]:
        """Evaluation preprocessing, as YAML primitives, stored in the checkpoint for inference."""

    def _loader(self, dataset: Dataset | None, stage: str, train: bool = False) -> DataLoader:
        """A DataLoader over ``dataset`` with augmentation reseeding; a clear error if setup() left it
        empty."""
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {stage} dataset; check that its {stage} data is configured "
                "(and that setup() ran)."
            )
        if train and self.num_workers == 0:
            # In the main process the Compose RNG is not reseeded by workers: draw its seed from torch so that
            # seed_everything makes the run reproducible, and offset it by the rank so DDP ranks differ.
            rank = self.trainer.global_rank if self.trainer is not None else 0
            seed_transform(dataset, int(torch.randint(0, 2**31 - 1, ()).item()) + 7919 * rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=seed_worker,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped (mixup needs even batches)."""
        return self._loader(self.train_dataset, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_dataset, "validation")

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_dataset, "test")

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches (``{"image", "id"}``) in a fixed order."""
        return self._loader(self.predict_dataset, "predict")
