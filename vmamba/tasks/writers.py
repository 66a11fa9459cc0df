"""``PredictionWriter``: saves what ``train.py predict`` computes (the Lightning CLI discards return values).

It writes with :mod:`vmamba.writers`, the writer of ``vmamba-predict``, so both give the same schema
(docs/inference.md): classification results in ``predictions.csv`` (or ``.json``) keyed by ``filename``
(the image's path relative to the predicted folder, or the dataset index), segmentation masks as
``masks/<name>.png`` with clash-free names. Use it from YAML:

    trainer:
      callbacks:
        - class_path: vmamba.tasks.PredictionWriter
          init_args: {output_dir: predictions, topk: 3}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from vmamba.imageio import safe_relative_path
from vmamba.writers import (
    MASKS_DIR,
    RESULT_FORMATS,
    OutputNamer,
    inside,
    result_columns,
    result_record,
    save_mask,
    write_results,
)

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write predictions of classification or segmentation tasks to ``output_dir``.

    Args:
        output_dir: folder for the results table or the ``masks/`` folder (created if missing).
        topk: number of classes per image in the table.
        results_format: ``"csv"`` or ``"json"``.
        include_index: also write the class indices.
    """

    def __init__(
        self,
        output_dir: str = "predictions",
        topk: int = 1,
        results_format: str = "csv",
        include_index: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if results_format not in RESULT_FORMATS:
            raise ValueError(f"results_format must be one of {RESULT_FORMATS}, got {results_format!r}")
        self.output_dir = Path(output_dir)
        self.topk = topk
        self.results_format = results_format
        self.include_index = include_index
        self._rows: dict[str, dict[str, Any]] = {}
        self._header: list[str] = []
        self._namer = OutputNamer(".png")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._header = {}, []
        self._namer = OutputNamer(".png")
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
        ids = batch.get("id") if isinstance(batch, dict) else None
        if ids is None:  # no ids in the batch: use the dataset indices
            ids = batch_indices or range(batch_idx * len(prediction), (batch_idx + 1) * len(prediction))
        ids = [str(i) for i in ids]
        if prediction.ndim == 2:
            names = pl_module.hparams.get("class_names") or None
            k = min(self.topk, prediction.shape[1])
            self._header = result_columns(k, self.include_index)
            probs, classes = prediction.float().topk(k, dim=1)
            for sample_id, p, c in zip(ids, probs.tolist(), classes.tolist()):
                labels = [names[i] if names else i for i in c]
                flat = self.results_format == "csv"
                self._rows[sample_id] = result_record(c, p, labels, self.include_index, flat)
        elif prediction.ndim == 4:
            masks = prediction.argmax(dim=1).cpu().numpy()
            for sample_id, mask in zip(ids, masks):
                rel = self._namer(safe_relative_path(sample_id))
                save_mask(inside(self.output_dir / MASKS_DIR, rel), mask, prediction.shape[1])
        else:
            raise ValueError(f"Cannot write predictions of shape {tuple(prediction.shape)}.")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._rows:
            return
        rank = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = self.output_dir / f"predictions{rank}.{self.results_format}"
        write_results(path, self.results_format, self._rows, self._header)
