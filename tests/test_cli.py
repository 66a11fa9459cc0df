"""The Lightning CLI (``train.py`` / ``vmamba-train``): every config under fast_dev_run, print_config, links,
validate/test/predict from a checkpoint, resume after a kill mid-epoch, DDP on two CPU processes, and the real
quickstart run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vmamba.cli import create_cli, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_VIM = "{img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, global_pool: avg}"
TINY_VMAMBA = "{depths: [1, 1, 1, 1], dims: 16}"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _cpu(root: Path) -> list[str]:
    """Overrides that put any config on one CPU process, quietly, under ``root``."""
    return [
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.num_nodes=1",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def _quickstart(root: Path, *extra: str) -> list[str]:
    """The quickstart config with a tiny Vim on 16x16 digits."""
    return [
        "--config",
        str(CONFIGS / "quickstart.yaml"),
        *extra,
        *_cpu(root),
        "--data.init_args.img_size=16",
        "--data.init_args.batch_size=32",
        f"--model.init_args.model_kwargs={TINY_VIM}",
    ]


def _image_tree(root: Path, classes: int = 2, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"{i}.jpg"
            )
    return root


def _seg_tree(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 6, (40, 48), dtype=np.uint8)).save(root / "masks" / f"{i}.png")
    return root


def test_print_config_shows_the_resolved_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "vim_tiny_patch16_224" in out and "vmamba.data.DigitsDataModule" in out
    assert "WarmupCosineLR" in out


def test_quickstart_fast_dev_run_links_data_to_model(tmp_path: Path) -> None:
    cli = create_cli(["fit", *_quickstart(tmp_path, "--trainer.fast_dev_run=2")])
    model = cli.model
    assert model.hparams.num_classes == 10 and model.hparams.class_names == [str(i) for i in range(10)]
    assert model.hparams.data_config["grayscale"] is True
    assert model.hparams.data_config["input_size"] == [3, 16, 16]
    assert cli.trainer.global_step == 2


def test_seg_quickstart_fast_dev_run(tmp_path: Path) -> None:
    cli = create_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "seg_quickstart.yaml"),
            *_cpu(tmp_path),
            "--trainer.fast_dev_run=1",
            "--data.init_args.num_train=8",
            "--data.init_args.num_val=2",
            "--data.init_args.img_size=32",
            "--data.init_args.batch_size=4",
            f"--model.init_args.backbone_kwargs={TINY_VMAMBA}",
            "--model.init_args.decoder_kwargs={channels: 16}",
        ]
    )
    assert cli.model.hparams.num_classes == 4 and cli.model.hparams.class_names[1] == "circle"
    assert "val_miou" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("config", "model_kwargs", "img_size"),
    [("vim_tiny_in1k.yaml", TINY_VIM, 16), ("vmamba_tiny_in1k.yaml", TINY_VMAMBA, 32)],
)
def test_imagenet_configs_fast_dev_run(tmp_path: Path, config: str, model_kwargs: str, img_size: int) -> None:
    data = _image_tree(tmp_path / "data")
    cli = create_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            *_cpu(tmp_path / "run"),
            "--trainer.fast_dev_run=1",
            f"--data.init_args.train_dir={data}",
            f"--data.init_args.val_dir={data}",
            f"--data.init_args.img_size={img_size}",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--data.init_args.persistent_workers=false",
            "--data.init_args.pin_memory=false",
            f"--model.init_args.model_kwargs={model_kwargs}",
        ]
    )
    assert cli.model.hparams.num_classes == 2 and cli.model.hparams.class_names == ["class0", "class1"]
    assert cli.model.mixup is not None
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss_step"])


def test_ade20k_config_fast_dev_run(tmp_path: Path) -> None:
    data = _seg_tree(tmp_path / "ade")
    cli = create_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "upernet_vmamba_tiny_ade20k.yaml"),
            *_cpu(tmp_path / "run"),
            "--trainer.fast_dev_run=1",
            f"--data.init_args.train_dir={data}",
            f"--data.init_args.val_dir={data}",
            "--data.init_args.crop_size=32",
            "--data.init_args.base_size=32",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--data.init_args.persistent_workers=false",
            "--data.init_args.pin_memory=false",
            f"--model.init_args.backbone_kwargs={TINY_VMAMBA}",
            "--model.init_args.decoder_kwargs={channels: 16}",
        ]
    )
    assert cli.model.hparams.num_classes == 150 and cli.model.model.aux_head is not None
    assert "val_miou" in cli.trainer.callback_metrics


def test_bad_data_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "vim_tiny_in1k.yaml"),
                *_cpu(tmp_path / "run"),
                f"--data.init_args.train_dir={tmp_path / 'empty'}",
            ]
        )


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_validate_test_predict_from_checkpoint(tmp_path: Path) -> None:
    callbacks = _write(
        tmp_path / "callbacks.yaml",
        f"""
        trainer:
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{save_last: true}}
            - class_path: vmamba.tasks.PredictionWriter
              init_args: {{output_dir: {tmp_path / "pred"}, topk: 2}}
        """,
    )
    main(
        [
            "fit",
            *_quickstart(tmp_path, "--config", str(callbacks), "--trainer.max_steps=2"),
            "--trainer.limit_val_batches=1",
        ]
    )
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    hp = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert hp["model"] == "vim_tiny_patch16_224" and hp["class_names"][9] == "9"
    (run_config,) = tmp_path.glob("lightning_logs/version_0/config.yaml")
    common = ["--config", str(run_config), "--ckpt_path", str(ckpt), "--trainer.limit_val_batches=1"]
    validate = create_cli(["validate", *common])
    assert "val_acc" in validate.trainer.callback_metrics
    test = create_cli(["test", *common, "--trainer.limit_test_batches=1"])
    assert "test_acc" in test.trainer.callback_metrics
    main(["predict", *common, "--trainer.limit_predict_batches=2"])
    lines = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "filename,label_0,label_1,prob_0,prob_1" and len(lines) == 1 + 2 * 32


KILLER = """
import os
from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    \"\"\"Ends the process abruptly (no cleanup, no checkpoint on exit) after optimizer step ``step``.\"\"\"

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os._exit(3)
"""


def test_killed_run_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "killer.py").write_text(KILLER)
    every_2 = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 2, "filename": "step-{step}", "save_last": True},
    }
    killer = {"class_path": "killer.KillAtStep", "init_args": {"step": 3}}
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump({"trainer": {"callbacks": [every_2, killer]}}))
    cmd = [sys.executable, str(REPO / "train.py"), "fit", *_quickstart(tmp_path, "--config", str(killed))]
    env = dict(ENV, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")
    assert saved["global_step"] == 2 and saved["epoch"] == 0  # mid-epoch: an epoch has 44 steps

    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(yaml.safe_dump({"trainer": {"callbacks": [every_2]}}))
    cli = create_cli(
        ["fit", *_quickstart(tmp_path, "--config", str(resumed), "--trainer.max_steps=4"), "--ckpt_path=last"]
    )
    assert Path(cli.trainer.ckpt_path).resolve() == last.resolve()
    assert cli.trainer.global_step == 4
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 4


@pytest.mark.slow  # two spawned processes importing torch + Lightning: ~20 s idle, 80 s on a busy 2-core box
def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        *_quickstart(tmp_path, "--trainer.fast_dev_run=2"),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
    ]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path: Path) -> None:
    """The README's main command, for real: about 1.5 CPU-minutes on an idle core."""
    torch.set_num_threads(1)
    cli = create_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.callback_metrics["val_acc"] >= 0.95
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and (
        tmp_path / "checkpoints" / "last.ckpt"
    ).is_file()


# ------------------------------------------------------------------------ installed console scripts


def _script(name: str) -> str:
    """The installed console script ``name``, next to the running interpreter."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)


@pytest.mark.parametrize("name", ["vmamba-train", "vmamba-predict", "vmamba-export"])
def test_console_scripts_help_shows_defaults(name: str) -> None:
    args = [_script(name)] + (["fit", "--help"] if name == "vmamba-train" else ["--help"])
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "default" in proc.stdout
    if name == "vmamba-predict":
        assert "(default: 32)" in proc.stdout and "--slide-window" in proc.stdout


def test_console_scripts_exit_status(tmp_path: Path) -> None:
    """0 after a completed fit (with the best score and checkpoint named), 2 for bad arguments."""
    cmd = [_script("vmamba-train"), "fit", *_quickstart(tmp_path, "--trainer.max_steps=2")]
    cmd += ["--trainer.limit_val_batches=1", "--trainer.limit_train_batches=2", "--trainer.max_epochs=1"]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best val_acc" in proc.stdout and "checkpoints/best.ckpt" in proc.stdout
    assert not list((tmp_path / "checkpoints").glob("*step=*"))  # names without step-step=
    proc = subprocess.run([_script("vmamba-predict")], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "no input given" in proc.stderr


INTERRUPT = """
import os
import signal
from lightning.pytorch.callbacks import Callback


class CtrlC(Callback):
    \"\"\"Sends SIGINT to its own process after optimizer step ``step``, as Ctrl-C in a terminal would.\"\"\"

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
"""


@pytest.mark.slow  # a spawned training process: ~15 s idle
def test_ctrl_c_in_training_exits_130_with_a_resume_hint(tmp_path: Path) -> None:
    (tmp_path / "ctrlc.py").write_text(INTERRUPT)
    every_2 = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 2, "save_last": True},
    }
    stop = {"class_path": "ctrlc.CtrlC", "init_args": {"step": 3}}
    config = tmp_path / "ctrlc.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [every_2, stop]}}))
    cmd = [_script("vmamba-train"), "fit", *_quickstart(tmp_path, "--config", str(config))]
    env = dict(ENV, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("vmamba-train: interrupted")]
    assert "checkpoints/last.ckpt (step 2)" in line and "--ckpt_path last" in line
    assert "Traceback" not in proc.stderr


def test_ctrl_c_in_predict_exits_130_with_a_resume_hint(tmp_path: Path, monkeypatch, capsys) -> None:
    import vmamba.predict

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vmamba.predict, "_run_classification", interrupted)
    monkeypatch.setattr(vmamba.predict, "load_model_from_args", lambda args, prog: _FakeLoaded())
    assert vmamba.predict.main([str(tmp_path), "--results-dir", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and str(tmp_path / "out") in err[0]


class _FakeLoaded:
    """Just enough of a LoadedModel for the run loop to start."""

    task = "classification"
    data_config = {"task": "classification", "input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3}

    class model:  # noqa: N801
        @staticmethod
        def to(device):
            return None
