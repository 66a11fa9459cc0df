"""VMamba (SS2D) timm models: official fidelity, checkpoint conversion, timm API, features, precision, export."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from official_vmamba import (
    TINY,
    TINY_S1L8,
    CfgNode,
    as_mmseg_checkpoint,
    official_backbone_features,
    official_logits,
    random_official_state_dict,
    to_grouped_projection_layout,
    to_legacy_names,
)
from timm.optim import create_optimizer_v2

import vmamba  # noqa: F401  (registers the models)
from vmamba.models.vmamba import VMamba, checkpoint_filter_fn

TINY_ARGS = dict(dims=16, depths=(1, 1, 2, 1))  # the architecture of official_vmamba.TINY
PARAM_COUNTS = {
    "vmamba_tiny_s1l8": 30_249_064,
    "vmamba_small_s1l20": 49_012_840,
    "vmamba_base_s1l20": 86_614_504,
    "vmamba_tiny_s2l5": 30_705_832,
    "vmamba_small_s2l15": 50_147_752,
    "vmamba_base_s2l15": 88_557_800,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _save(path, model_sd, ema_sd=None, **extra) -> str:
    """An official training checkpoint: weights, EMA weights and the pickled training config."""
    checkpoint = {"model": model_sd, "config": CfgNode(MODEL=CfgNode(TYPE="vssm")), "epoch": 264, **extra}
    if ema_sd is not None:
        checkpoint["model_ema"] = ema_sd
    torch.save(checkpoint, path)
    return str(path)


def _tiny(**kwargs) -> VMamba:
    return timm.create_model("vmamba_tiny_s1l8", **dict(TINY_ARGS, **kwargs)).eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(path, model weights, EMA weights) of a random official checkpoint of the TINY architecture."""
    model_sd = random_official_state_dict(TINY, seed=1)
    ema_sd = random_official_state_dict(TINY, seed=2)
    path = _save(tmp_path_factory.mktemp("vmamba") / "tiny.pth", model_sd, ema_sd)
    return path, model_sd, ema_sd


# ---------------------------------------------------------------------------------------------------
# Registration, configs, parameter counts


def test_registered_with_timm():
    assert sorted(timm.list_models(module="vmamba")) == sorted(PARAM_COUNTS)
    for name in PARAM_COUNTS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.origin_url.endswith(".pth") and cfg.notes[0].startswith("official release file: ")
        assert not cfg.url and not cfg.hf_hub_id  # metadata only: nothing downloads
    assert timm.models.get_pretrained_cfg("vmamba_tiny_s1l8").origin_url.endswith(
        "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    )


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_equal_official(name):
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_pretrained_without_file_says_where_weights_come_from():
    with pytest.raises(RuntimeError, match="vssm1_tiny_0230s_ckpt_epoch_264.pth"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True)


def test_official_initialisation():
    torch.manual_seed(0)
    model = _tiny()
    ss2d = model.stages[1].blocks[0].mixer
    n, d = ss2d.d_state, ss2d.d_inner
    assert torch.equal(ss2d.A_logs, torch.log(torch.arange(1, n + 1.0)).repeat(4 * d, 1))
    assert torch.equal(ss2d.Ds, torch.ones(4 * d))
    dt = torch.nn.functional.softplus(ss2d.dt_projs_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert ss2d.dt_projs_weight.abs().max() <= ss2d.dt_rank**-0.5
    assert ss2d.x_proj_weight.abs().max() <= d**-0.5
    # trunc_normal_(std=0.02) as the official _init_weights (timm's bounds are +-2 absolute).
    for weight in (
        ss2d.in_proj.weight,
        ss2d.out_proj.weight,
        model.head.fc.weight,
        model.stages[3].blocks[0].mlp.fc2.weight,
    ):
        assert 0.015 < weight.std() < 0.025
    assert torch.all(model.head.fc.bias == 0) and torch.all(model.stages[0].blocks[0].mlp.fc1.bias == 0)
    assert model.stem.norm1.eps == 1e-5 and ss2d.out_norm.eps == 1e-5


# ---------------------------------------------------------------------------------------------------
# Official checkpoints: logits equal the official forward


@pytest.mark.parametrize("size", [(64, 64), (97, 130)])
def test_official_checkpoint_gives_official_logits(tiny_checkpoint, size):
    path, model_sd, ema_sd = tiny_checkpoint
    torch.manual_seed(0)
    model = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
    expected = official_logits(model_sd, x, TINY)
    assert expected.abs().max() > 1.0  # logits of a scale where 1e-4 is a real bound
    assert (logits - expected).abs().max() <= 1e-4
    # The default is the 'model' weights, not the EMA ones.
    assert (logits - official_logits(ema_sd, x, TINY)).abs().max() > 1e-2


def test_official_checkpoint_ema_on_request(tiny_checkpoint):
    path, _, ema_sd = tiny_checkpoint
    model = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path, use_ema=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - official_logits(ema_sd, x, TINY)).abs().max() <= 1e-4


def test_fidelity_test_detects_a_wrong_scan_order(tiny_checkpoint):
    """Swapping the parameters of two directions must change the logits beyond the tolerance."""
    path, model_sd, _ = tiny_checkpoint
    model = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    swapped = dict(model_sd)
    for key in [k for k in model_sd if k.endswith("op.x_proj_weight")]:
        swapped[key] = model_sd[key][[0, 2, 1, 3]]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - official_logits(swapped, x, TINY)).abs().max() > 1e-2


def test_vmamba_tiny_s1l8_official_logits(tmp_path):
    model_sd = random_official_state_dict(TINY_S1L8, seed=3)
    path = _save(tmp_path / "vssm1_tiny_0230s_ckpt_epoch_264.pth", model_sd, model_sd)
    model = timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = model.eval()(x)
    expected = official_logits(model_sd, x, TINY_S1L8)
    assert expected.abs().max() > 1.0
    assert (logits - expected).abs().max() <= 1e-4


def test_legacy_names_and_grouped_projections_load_the_same(tiny_checkpoint, tmp_path):
    _, model_sd, _ = tiny_checkpoint
    reference = _tiny()
    reference.load_state_dict(checkpoint_filter_fn(model_sd, reference))
    variant = to_legacy_names(to_grouped_projection_layout(model_sd))
    assert "layers.0.blocks.0.self_attention.x_proj.weight" in variant and "head.weight" in variant
    path = _save(tmp_path / "legacy.pth", variant)
    model = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_native_state_dict_round_trip(tiny_checkpoint, tmp_path):
    path, _, _ = tiny_checkpoint
    model = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    native = tmp_path / "native.pth"
    torch.save(model.state_dict(), native)
    again = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(native)))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_other_num_classes_and_in_chans_keep_the_trunk(tiny_checkpoint):
    path, model_sd, _ = tiny_checkpoint
    full = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    ten = _tiny(num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(full.forward_features(x), ten.forward_features(x))
        assert ten(x).shape == (1, 10)
    gray = _tiny(in_chans=1, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert gray.stem.conv1.weight.shape[1] == 1
    assert torch.allclose(gray.stem.conv1.weight[:, 0], model_sd["patch_embed.0.weight"].sum(1))


# ---------------------------------------------------------------------------------------------------
# Mismatches are errors that name the keys


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    sd = random_official_state_dict(TINY, seed=4)
    del sd["layers.1.blocks.0.op.Ds"]
    sd["layers.0.blocks.0.op.x_proj_bias"] = torch.zeros(4, 3)
    sd["layers.2.blocks.1.op.A_logs"] = torch.zeros(256, 16)
    path = _save(tmp_path / "bad.pth", sd)
    with pytest.raises(RuntimeError) as err:
        _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    message = str(err.value)
    assert "stages.1.blocks.0.mixer.Ds" in message
    assert "stages.0.blocks.0.mixer.x_proj_bias" in message
    assert "stages.2.blocks.1.mixer.A_logs: checkpoint (256, 16) vs model (256, 1)" in message


def test_wrong_variant_is_an_error(tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    with pytest.raises(RuntimeError, match="shape mismatches"):
        timm.create_model("vmamba_tiny_s1l8", dims=32, depths=(1, 1, 2, 1), pretrained=True,
                          pretrained_cfg_overlay=dict(file=path))  # fmt: skip
    with pytest.raises(RuntimeError, match="missing keys"):
        timm.create_model("vmamba_tiny_s1l8", dims=16, depths=(1, 1, 3, 1), pretrained=True,
                          pretrained_cfg_overlay=dict(file=path))  # fmt: skip


def test_missing_ema_weights_is_an_error(tmp_path):
    path = _save(tmp_path / "no_ema.pth", random_official_state_dict(TINY, seed=5))
    with pytest.raises(ValueError, match="EMA"):
        _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path, use_ema=True))


# ---------------------------------------------------------------------------------------------------
# Dense prediction: features_only, stage norms, mmseg checkpoints


def test_features_only_shapes_and_strides_at_odd_size():
    model = _tiny(features_only=True)
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 97, 130))
    assert [tuple(f.shape) for f in feats] == [
        (2, 16, 25, 33),
        (2, 32, 13, 17),
        (2, 64, 7, 9),
        (2, 128, 4, 5),
    ]
    for f, r in zip(feats, [4, 8, 16, 32]):
        assert f.shape[-2] == math.ceil(97 / r) and f.shape[-1] == math.ceil(130 / r)

    some = _tiny(features_only=True, out_indices=(1, 3))
    assert some.feature_info.reduction() == [8, 32]
    assert [f.shape[1] for f in some(torch.randn(1, 3, 64, 64))] == [32, 128]
    # A user feature_cfg is merged with the defaults instead of clashing with them.
    listed = _tiny(features_only=True, feature_cfg=dict(out_indices=(2,)))
    assert listed.feature_info.reduction() == [16]


def test_dense_prediction_checkpoint_gives_official_features(tmp_path):
    backbone_sd = random_official_state_dict(TINY, seed=6, classifier=False, outnorms=True)
    path = tmp_path / "upernet_vssm_4xb4-160k_ade20k-512x512_tiny_iter_160000.pth"
    torch.save(as_mmseg_checkpoint(backbone_sd), path)
    model = _tiny(features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        feats = model(x)
    for ours, official in zip(feats, official_backbone_features(backbone_sd, x, TINY)):
        assert ours.shape == official.shape
        assert (ours - official).abs().max() <= 1e-4
    # A dense-prediction checkpoint has no classifier: loading it into a classifier is an error.
    with pytest.raises(RuntimeError, match="features_only=True"):
        _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_classification_checkpoint_into_features_only(tiny_checkpoint):
    """Fresh stage norms (as the official dense-prediction training starts), everything else loaded."""
    path, model_sd, _ = tiny_checkpoint
    model = _tiny(features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    norms = model.model.feature_norms
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) and torch.all(n.bias == 0) for n in norms)
    x = torch.randn(1, 3, 64, 64)
    sd = dict(
        model_sd,
        **{f"outnorm{i}.{p}": norms[i].state_dict()[p] for i in range(4) for p in ("weight", "bias")},
    )
    with torch.no_grad():
        for ours, official in zip(model(x), official_backbone_features(sd, x, TINY)):
            assert (ours - official).abs().max() <= 1e-4


def test_forward_intermediates():
    model = _tiny()
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [16, 32, 64, 128]
        last = model.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NHWC")
        assert (
            len(last) == 1
            and last[0].shape == (1, 4, 5, 128)
            and torch.equal(last[0], inter[-1].permute(0, 2, 3, 1))
        )
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[1])
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        assert torch.equal(normed[0], final)


# ---------------------------------------------------------------------------------------------------
# timm API


def test_timm_api():
    model = _tiny(num_classes=7, global_pool="avg", drop_path_rate=0.1, img_size=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 3, 3)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert model(x).shape == (2, 128)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 128, 3, 3)
        model.reset_classifier(5, "max")
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    assert _tiny(num_classes=0, global_pool="")(x).dim() == 4

    no_wd = model.no_weight_decay()
    assert "stages.0.blocks.0.mixer.A_logs" in no_wd and "stages.3.blocks.0.mixer.Ds" in no_wd
    assert len(no_wd) == 2 * sum(TINY.depths)
    groups = timm.models.group_parameters(model, model.group_matcher())
    # stem, one group per block (downsample with block 0, final norm with the last), unmatched head
    assert len(groups) == 1 + sum(TINY.depths) + 1
    assert "norm.weight" in groups[len(groups) - 2] and "stages.1.downsample.conv.weight" in groups[2]
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    a_log = model.stages[0].blocks[0].mixer.A_logs
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups if any(p is a_log for p in g["params"]))


def test_grad_checkpointing_gives_identical_output_and_grads():
    torch.manual_seed(0)
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    out2 = model(x)
    out2.sum().backward()
    assert torch.equal(out, out2)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_backward_reaches_every_parameter():
    model = _tiny(num_classes=42).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_outputs_and_grads_finite(dtype):
    torch.manual_seed(0)
    model = _tiny(num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss = out.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        reference = model.eval()(x)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x).float()
    assert (low - reference).abs().max() < 0.1 * reference.abs().max() + 0.1


# ---------------------------------------------------------------------------------------------------
# torch.compile and ONNX (vmamba_tiny_s1l8 at 64x64 on CPU)


@pytest.mark.slow
def test_torch_compile_vmamba_tiny_s1l8():
    """One graph (fullgraph=True: no graph breaks, the scan is one custom op), forward and backward."""
    torch.manual_seed(0)
    model = timm.create_model("vmamba_tiny_s1l8", num_classes=10, drop_path_rate=0.0)  # deterministic
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert (out - expected).abs().max() <= 1e-5
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_onnx_export_vmamba_tiny_s1l8_matches_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = timm.create_model("vmamba_tiny_s1l8").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    path = str(tmp_path / "vmamba_tiny_s1l8.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["image"])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": x.numpy()})
    assert abs(out - expected.numpy()).max() <= 1e-4
