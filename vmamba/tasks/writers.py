"""``PredictionWriter``: saves what ``train.py predict`` computes (the Lightning CLI discards return values).

Classification probabilities go to ``predictions.csv`` (``id, label, prob`` for the top-k classes);
segmentation probabilities become one single-channel PNG of class indices per image, named after the input
file's stem. Use it from YAML:

    trainer:
      callbacks:
        - class_path: vmamba.tasks.PredictionWriter
          init_args: {output_dir: predictions, topk: 3}
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write predictions of classification or segmentation tasks to ``output_dir``.

    Args:
        output_dir: folder for ``predictions.csv`` or the mask PNGs (created if missing).
        topk: number of classes per image in the CSV.
    """

    def __init__(self, output_dir: str = "predictions", topk: int = 1) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.topk = topk
        self._rows: list[list[Any]] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: torch.Tensor,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        names = pl_module.hparams.get("class_names") or None
        ids = batch.get("id") if isinstance(batch, dict) else None
        if ids is None:  # no ids in the batch: use the dataset indices
            ids = batch_indices or range(batch_idx * len(prediction), (batch_idx + 1) * len(prediction))
        ids = [str(i) for i in ids]
        if prediction.ndim == 2:
            k = min(self.topk, prediction.shape[1])
            probs, classes = prediction.float().topk(k, dim=1)
            for sample_id, p, c in zip(ids, probs.tolist(), classes.tolist()):
                labels = [names[i] if names else str(i) for i in c]
                self._rows.append([sample_id] + [v for pair in zip(labels, p) for v in pair])
        elif prediction.ndim == 4:
            masks = prediction.argmax(dim=1).cpu().numpy()
            for sample_id, mask in zip(ids, masks):
                dtype = np.uint8 if mask.max(initial=0) < 256 else np.uint16
                Image.fromarray(mask.astype(dtype)).save(self.output_dir / f"{Path(sample_id).stem}.png")
        else:
            raise ValueError(f"Cannot write predictions of shape {tuple(prediction.shape)}.")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._rows:
            return
        rank = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        k = (len(self._rows[0]) - 1) // 2
        header = ["id"] + [f"{kind}_{i}" for i in range(k) for kind in ("label", "prob")]
        with open(self.output_dir / f"predictions{rank}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(self._rows)
