"""Parameter groups (weight decay exclusions, layer-wise lr decay) and the warmup schedules."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import vmamba  # noqa: F401  (registers the models)
from vmamba.tasks import ClassificationTask, WarmupCosineLR, WarmupPolyLR, param_groups

TINY_VIM = {"img_size": 16, "patch_size": 4, "depth": 3, "embed_dim": 32}


def _names(model: torch.nn.Module, groups: list[dict]) -> dict[str, dict]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: g for g in groups for p in g["params"]}


def test_no_weight_decay_on_norms_biases_embeddings_and_ssm_params() -> None:
    model = timm.create_model("vim_tiny_patch16_224", num_classes=4, **TINY_VIM)
    named = _names(model, param_groups(model))
    assert len(named) == sum(1 for _ in model.parameters())
    no_decay = {n for n, g in named.items() if g.get("weight_decay") == 0.0}
    for name in (
        "pos_embed",
        "cls_token",
        "blocks.0.mixer.A_log",
        "blocks.0.mixer.A_b_log",
        "blocks.1.mixer.D",
    ):
        assert name in no_decay, name
    assert all(n in no_decay for n in named if n.endswith(".bias") or "norm" in n)
    decay = set(named) - no_decay
    assert "blocks.0.mixer.in_proj.weight" in decay and "head.weight" in decay
    assert all("weight_decay" not in named[n] for n in decay)  # inherits the optimizer's value


def test_layer_decay_scales_group_lrs() -> None:
    task = ClassificationTask(
        "vim_tiny_patch16_224",
        num_classes=4,
        model_kwargs=TINY_VIM,
        layer_decay=0.5,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1.0, weight_decay=0.1),
    )
    optimizer = task.configure_optimizers()
    lrs = {}
    by_id = {id(p): n for n, p in task.model.named_parameters()}
    for g in optimizer.param_groups:
        for p in g["params"]:
            lrs[by_id[id(p)]] = g["lr"]
        assert g["weight_decay"] in (0.0, 0.1)
    # timm's grouping: stem = layer 0, one layer per block, final norm + head on top at the full rate.
    assert lrs["head.weight"] == 1.0
    assert lrs["blocks.2.mixer.in_proj.weight"] == 0.5
    assert lrs["blocks.0.mixer.in_proj.weight"] == 0.5**3
    assert lrs["patch_embed.proj.weight"] == 0.5**4 == lrs["pos_embed"]


def test_layer_decay_needs_group_matcher() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="group_matcher"):
        param_groups(model, layer_decay=0.9)


def test_warmup_cosine_and_poly() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params, "lr": 1.0}])
    sched = WarmupCosineLR(opt, warmup_epochs=1, warmup_start_ratio=0.0, min_lr_ratio=0.1)
    assert not sched.resolved
    sched.resolve(total_steps=110, steps_per_epoch=10)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    opt = torch.optim.SGD([{"params": params, "lr": 2.0}])
    poly = WarmupPolyLR(opt, total_steps=100, warmup_steps=0, power=1.0)
    for _ in range(50):
        opt.step()
        poly.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    # The schedule state (lengths included) survives a checkpoint round trip.
    state = poly.state_dict()
    fresh = WarmupPolyLR(torch.optim.SGD([{"params": params, "lr": 2.0}]))
    fresh.load_state_dict(state)
    assert fresh.total_steps == 100 and fresh.last_epoch == 50
