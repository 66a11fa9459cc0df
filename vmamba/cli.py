"""The ``vmamba-train`` command (also ``python train.py``): a LightningCLI over vmamba's tasks and data
modules.

    vmamba-train fit --config configs/quickstart.yaml
    vmamba-train fit --config configs/quickstart.yaml --print_config
    vmamba-train validate --config runs/quickstart/lightning_logs/version_0/config.yaml --ckpt_path last

The task and data module are chosen in YAML (``class_path`` + ``init_args``; short names such as
``ClassificationTask`` work). The data module's ``num_classes``, ``class_names`` and ``data_config`` are
linked into the task, so they are written once and end up in the checkpoint. The CLI's automatic
``--optimizer`` / ``--lr_scheduler`` are disabled: they would replace the task's parameter groups; configure
``model.init_args.optimizer`` and ``model.init_args.lr_scheduler`` instead. See docs/training.md.

:func:`main` returns the process exit status: 0 after a completed run, 130 after Ctrl-C (with one line
naming the last checkpoint written and how to resume), 2 for command-line errors.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
from lightning import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import vmamba.tasks  # noqa: F401  (short class names in YAML need the modules imported)
from vmamba.data import BaseDataModule, import_data_modules
from vmamba.tasks import BaseTask

__all__ = ["VMambaCLI", "create_cli", "main"]

import_data_modules()


class _RunRecord(Callback):
    """Remembers the last checkpoint written and whether the run was interrupted (for the exit message)."""

    def __init__(self) -> None:
        self.interrupted = False
        self.last_step: int | None = None
        self.last_path: str | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.last_step = trainer.global_step

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.interrupted = isinstance(exception, KeyboardInterrupt)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
                self.last_path = callback.last_model_path

    def message(self) -> str:
        """One line: what the interrupted run wrote and how to resume it."""
        if self.last_path is None:
            return "vmamba-train: interrupted before a last checkpoint was written; run the same command to start again"
        step = f" (step {self.last_step})" if self.last_step is not None else ""
        return (
            f"vmamba-train: interrupted; last checkpoint {_relative(self.last_path)}{step}; resume with the same "
            "command plus --ckpt_path last"
        )


class VMambaCLI(LightningCLI):
    """LightningCLI with vmamba's data -> task links (``num_classes``, ``class_names``, ``data_config``),
    checkpoints in ``<default_root_dir>/checkpoints`` and a summary line after ``fit``.

    Lightning's default checkpoint folder is per logger version (``lightning_logs/version_N/checkpoints``), so
    a new run cannot find the previous run's ``last.ckpt``; a fixed folder makes ``--ckpt_path last`` resume.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "class_names", "data_config"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with ``dirpath`` of every ``ModelCheckpoint`` that has none set to
        ``<default_root_dir>/checkpoints``."""
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        return trainer

    def after_fit(self) -> None:
        """Print the best score and where the best and last checkpoints are."""
        print(fit_summary(self.trainer), flush=True)


def _relative(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def fit_summary(trainer: Trainer) -> str:
    """``Best val_acc 0.9722 (epoch 14): runs/quickstart/checkpoints/best.ckpt; last: .../last.ckpt``."""
    parts = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.monitor and callback.best_model_path:
            score = callback.best_model_score
            value = f"{float(score):.4f}" if score is not None else "n/a"
            parts.append(f"best {callback.monitor} {value}: {_relative(callback.best_model_path)}")
        if callback.last_model_path:
            parts.append(f"last: {_relative(callback.last_model_path)}")
    done = f"Finished {trainer.current_epoch} epochs ({trainer.global_step} steps)"
    return done + ("; " + "; ".join(dict.fromkeys(parts)) if parts else "; no checkpoint written") + "."


def create_cli(args: list[str] | None = None, trainer_defaults: dict[str, Any] | None = None) -> VMambaCLI:
    """Build and run the CLI on ``args`` (``sys.argv[1:]`` when ``None``); the returned object holds
    ``trainer``, ``model`` and ``datamodule``."""
    return VMambaCLI(
        model_class=BaseTask,
        datamodule_class=BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=trainer_defaults,
        auto_configure_optimizers=False,
        parser_kwargs={"default_env": True},
        args=args,
    )


def main(args: list[str] | None = None) -> int:
    """Entry point of ``vmamba-train`` and ``python train.py``: run the CLI, return the exit status."""
    record = _RunRecord()
    try:
        create_cli(args, trainer_defaults={"callbacks": [record]})
    except SystemExit as exit_:  # Lightning ends an interrupted run with sys.exit(1); argument errors with 2
        if record.interrupted:
            print(record.message(), file=sys.stderr)
            return 130
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        print(record.message(), file=sys.stderr)
        return 130
    return 0
