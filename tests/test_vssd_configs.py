"""The VSSD training configs through the Lightning CLI: fast_dev_run of each, and the real quickstart run."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vmamba.cli import create_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_VSSD = "{embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 2, 4, 8], d_state: 8}"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _cpu(root: Path) -> list[str]:
    return [
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.num_nodes=1",
        "--trainer.precision=32-true",
        *QUIET,
    ]


def test_vssd_tiny_in1k_fast_dev_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "data" / f"class{c}" / f"{i}.jpg")
    data = tmp_path / "data"
    cli = create_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "vssd_tiny_in1k.yaml"),
            *_cpu(tmp_path / "run"),
            "--trainer.fast_dev_run=1",
            f"--data.init_args.train_dir={data}",
            f"--data.init_args.val_dir={data}",
            "--data.init_args.img_size=32",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--data.init_args.persistent_workers=false",
            "--data.init_args.pin_memory=false",
            f"--model.init_args.model_kwargs={TINY_VSSD}",
        ]
    )
    assert cli.model.hparams.model == "vssd_tiny" and cli.model.hparams.num_classes == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss_step"])


def test_vssd_quickstart_fast_dev_run(tmp_path: Path) -> None:
    cli = create_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "vssd_quickstart.yaml"),
            *_cpu(tmp_path),
            "--trainer.fast_dev_run=2",
        ]
    )
    assert cli.model.hparams.num_classes == 10 and cli.trainer.global_step == 2


@pytest.mark.slow
def test_vssd_quickstart_reaches_97_percent(tmp_path: Path) -> None:
    """The VSSD quickstart for real: 15 epochs, a few CPU minutes (see docs/models.md)."""
    torch.set_num_threads(1)
    cli = create_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "vssd_quickstart.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert cli.trainer.callback_metrics["val_acc"] >= 0.97
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
