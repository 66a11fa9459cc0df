"""Safe checkpoint loading: envelopes, pickled training-script objects, strict fitting."""

from __future__ import annotations

import argparse
import sys
import textwrap

import pytest
import torch
from torch import nn

from vmamba.models._helpers import (
    check_state_dict_fits,
    load_checkpoint_file,
    load_state_dict_strict,
    resolve_pretrained_file,
)


@pytest.fixture()
def official_file(tmp_path, monkeypatch):
    """A file shaped like an official release: model + model_ema + pickled args and a yacs-like config."""
    pkg = tmp_path / "fake_pkgs" / "yacs_like"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(
        textwrap.dedent(
            """
            class CfgNode(dict):
                def __init__(self, d=None):
                    super().__init__(d or {})
                    self.__dict__["frozen"] = True
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "fake_pkgs"))
    from yacs_like.config import CfgNode  # type: ignore[import-not-found]

    path = tmp_path / "official.pth"
    torch.save(
        {
            "model": {"module.w": torch.ones(2, 3), "module.b": torch.zeros(2)},
            "model_ema": {"module.w": torch.full((2, 3), 2.0), "module.b": torch.ones(2)},
            "args": argparse.Namespace(lr=1e-3, model="vim"),
            "config": CfgNode({"MODEL": CfgNode({"NAME": "x"})}),
            "epoch": 299,
        },
        path,
    )
    # The training code that pickled the config is gone when the user loads the file.
    monkeypatch.delitem(sys.modules, "yacs_like.config")
    monkeypatch.delitem(sys.modules, "yacs_like")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "fake_pkgs" not in p])
    return path


def test_official_envelope_loads_model_weights_by_default(official_file):
    sd = load_checkpoint_file(official_file)
    assert set(sd) == {"w", "b"}
    assert torch.equal(sd["w"], torch.ones(2, 3))


def test_ema_weights_on_request(official_file):
    sd = load_checkpoint_file(official_file, use_ema=True)
    assert torch.equal(sd["w"], torch.full((2, 3), 2.0))


def test_ema_requested_but_absent_says_so(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.ones(1)}}, path)
    with pytest.raises(ValueError, match="EMA weights were requested"):
        load_checkpoint_file(path, use_ema=True)


def test_lightning_checkpoint_prefix_is_stripped(tmp_path):
    path = tmp_path / "task.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(1)}, "hyper_parameters": {"model": "x"}}, path)
    assert set(load_checkpoint_file(path)) == {"w"}


def test_safetensors_and_missing_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    assert set(load_checkpoint_file(path)) == {"w"}
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint_file(tmp_path / "nope.pth")


def test_resolve_pretrained_file_replaces_file_with_state_dict(official_file):
    kwargs = {"pretrained_cfg_overlay": {"file": str(official_file), "use_ema": True}}
    resolve_pretrained_file(True, kwargs)
    overlay = kwargs["pretrained_cfg_overlay"]
    assert "file" not in overlay and "use_ema" not in overlay
    assert torch.equal(overlay["state_dict"]["b"], torch.ones(2))


def test_strict_fit_names_every_bad_key():
    model = nn.Linear(3, 2)
    with pytest.raises(RuntimeError) as err:
        check_state_dict_fits(model, {"weight": torch.ones(2, 4), "extra": torch.ones(1)})
    text = str(err.value)
    assert "missing keys (1)" in text and "bias" in text
    assert "unexpected keys (1)" in text and "extra" in text
    assert "weight: checkpoint (2, 4) vs model (2, 3)" in text
    load_state_dict_strict(model, {"weight": torch.zeros(2, 3), "bias": torch.ones(2)})
    assert torch.equal(model.bias.data, torch.ones(2))
