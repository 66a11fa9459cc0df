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
"""

from __future__ import annotations

import os
from typing import Any

from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import vmamba.data  # noqa: F401  (short class names in YAML need the modules imported)
import vmamba.tasks  # noqa: F401
from vmamba.data import BaseDataModule
from vmamba.tasks import BaseTask

__all__ = ["VMambaCLI", "main"]


class VMambaCLI(LightningCLI):
    """LightningCLI with vmamba's data -> task links (``num_classes``, ``class_names``, ``data_config``) and
    checkpoints in ``<default_root_dir>/checkpoints``.

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


def main(args: list[str] | None = None) -> VMambaCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when ``None``) and return it (``cli.trainer``,
    ``cli.model``)."""
    return VMambaCLI(
        model_class=BaseTask,
        datamodule_class=BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"default_env": True},
        args=args,
    )
