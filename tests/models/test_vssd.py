"""VSSD timm models: official fidelity, checkpoint conversion, timm API, features, segmentation, precision."""

import math

import pytest
import timm
import torch
from official_vssd import (
    TINY,
    VSSD_MICRO,
    CfgNode,
    as_mmseg_checkpoint,
    official_backbone_features,
    official_logits,
    random_official_state_dict,
)
from timm.optim import create_optimizer_v2

import vmamba  # noqa: F401  (registers the models)
from vmamba.models.vssd import VSSD

TINY_ARGS = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), d_state=8)  # official_vssd.TINY
PARAM_COUNTS = {  # the official VMAMBA2 built from the vssd_*_e300 configs (13.51M, 24.27M, 40.08M, 88.82M)
    "vssd_micro": 13_512_964,
    "vssd_tiny": 24_270_724,
    "vssd_small": 40_075_650,
    "vssd_base": 88_823_151,
}
TOL = 1e-5  # relative to the largest logit (float32); float64 runs agree to 1e-10


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _save(path, model_sd, ema_sd=None, **extra) -> str:
    """An official training checkpoint: weights, EMA weights and the pickled training config."""
    checkpoint = {"model": model_sd, "config": CfgNode(MODEL=CfgNode(TYPE="vmamba2")), "epoch": 299, **extra}
    if ema_sd is not None:
        checkpoint.update(model_ema=ema_sd, max_accuray_ema=83.6)
    torch.save(checkpoint, path)
    return str(path)


def _tiny(**kwargs) -> VSSD:
    return timm.create_model("vssd_tiny", **dict(TINY_ARGS, **kwargs)).eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(path, model weights, EMA weights) of a random official checkpoint of the TINY architecture."""
    model_sd = random_official_state_dict(TINY, seed=1)
    ema_sd = random_official_state_dict(TINY, seed=2)
    path = _save(tmp_path_factory.mktemp("vssd") / "vssd_tiny_best_ema.pth", model_sd, ema_sd)
    return path, model_sd, ema_sd


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _close(ours, official, tol=TOL) -> bool:
    return _max_diff(ours, official) <= tol * max(1.0, official.abs().max().item())


# ---------------------------------------------------------------------------------------------------
# Registration, configs, parameter counts, initialisation


def test_registered_with_timm():
    assert sorted(timm.list_models(module="vssd")) == sorted(PARAM_COUNTS)
    assert timm.models.get_pretrained_cfg("vssd_tiny.in1k_mesa").origin_url.endswith("_e300_with_mesa.pth")
    for name in PARAM_COUNTS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.origin_url.startswith("https://huggingface.co/YuhengSSS/VSSD/") and not cfg.url
    assert timm.models.get_pretrained_cfg("vssd_micro").origin_url.endswith("vssd_micro_best.pth")


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_equal_official(name):
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_pretrained_without_file_says_where_weights_come_from():
    with pytest.raises(RuntimeError, match="vssd_tiny_best_ema.pth"):
        timm.create_model("vssd_tiny", pretrained=True)


def test_official_initialisation():
    model = _tiny()
    mixer = model.stages[1].blocks[0].mixer
    assert torch.all(mixer.A_log >= 0) and torch.all(mixer.A_log <= math.log(16))
    assert torch.equal(mixer.D, torch.ones(2))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None
    attention = model.stages[3].blocks[0].mixer
    assert attention.qkv.bias is None and attention.proj.bias is not None
    for weight in (mixer.in_proj.weight, attention.qkv.weight, model.stages[3].blocks[0].mlp.fc1.weight):
        assert 0.015 < weight.std() < 0.025
    assert torch.all(model.head.fc.bias == 0)


# ---------------------------------------------------------------------------------------------------
# Official checkpoints: logits equal the official forward


@pytest.mark.parametrize("size", [(64, 64), (97, 130)])
def test_official_checkpoint_gives_official_logits(tiny_checkpoint, size):
    path, model_sd, ema_sd = tiny_checkpoint
    model = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
    expected = official_logits(model_sd, x, TINY)
    assert expected.abs().max() > 1.0  # logits of a scale where the tolerance is a real bound
    assert _close(logits, expected)
    # The default is the 'model' weights, not the EMA ones.
    assert _max_diff(logits, official_logits(ema_sd, x, TINY)) > 1e-2
    # In float64 the two forwards agree to rounding.
    sd64 = {k: v.double() if v.is_floating_point() else v for k, v in model_sd.items()}
    with torch.no_grad():
        assert _max_diff(model.double()(x.double()), official_logits(sd64, x.double(), TINY)) <= 1e-10


def test_official_checkpoint_ema_on_request(tiny_checkpoint):
    path, _, ema_sd = tiny_checkpoint
    model = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path, use_ema=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _close(model(x), official_logits(ema_sd, x, TINY))


@pytest.mark.parametrize("swap", ["cpe", "heads"])
def test_fidelity_test_detects_swapped_parameters(tiny_checkpoint, swap):
    """Swapping the two depthwise convs of each block, or two heads' A_log, must break the comparison."""
    path, model_sd, _ = tiny_checkpoint
    model = _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    swapped = dict(model_sd)
    for key in model_sd:
        if swap == "cpe" and ".cpe1." in key:
            other = key.replace(".cpe1.", ".cpe2.")
            swapped[key], swapped[other] = model_sd[other], model_sd[key]
        if swap == "heads" and key.endswith("attn.A_log"):
            swapped[key] = model_sd[key].flip(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not _close(model(x), official_logits(swapped, x, TINY), tol=100 * TOL)


def test_vssd_micro_official_logits(tmp_path):
    model_sd = random_official_state_dict(VSSD_MICRO, seed=3)
    path = _save(tmp_path / "vssd_micro_best.pth", model_sd)
    model = timm.create_model("vssd_micro", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
    expected = official_logits(model_sd, x, VSSD_MICRO)
    assert expected.abs().max() > 1.0
    assert _close(logits, expected)


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
    assert torch.allclose(gray.stem.conv1.conv.weight[:, 0], model_sd["patch_embed.conv1.conv.weight"].sum(1))


# ---------------------------------------------------------------------------------------------------
# Mismatches are errors that name the keys


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    sd = random_official_state_dict(TINY, seed=4)
    del sd["layers.1.blocks.0.attn.D"]
    sd["layers.0.blocks.0.attn.in_proj.bias"] = torch.zeros(3)
    sd["layers.2.blocks.0.attn.A_log"] = torch.zeros(5)
    path = _save(tmp_path / "bad.pth", sd)
    with pytest.raises(RuntimeError) as err:
        _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=path))
    message = str(err.value)
    assert "stages.1.blocks.0.mixer.D" in message
    assert "stages.0.blocks.0.mixer.in_proj.bias" in message
    assert "stages.2.blocks.0.mixer.A_log: checkpoint (5,) vs model (4,)" in message


def test_wrong_variant_and_missing_ema_are_errors(tiny_checkpoint, tmp_path):
    path, _, _ = tiny_checkpoint
    with pytest.raises(RuntimeError, match="shape mismatches"):
        _tiny(embed_dim=32, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(RuntimeError, match="missing keys"):
        _tiny(depths=(1, 2, 2, 1), pretrained=True, pretrained_cfg_overlay=dict(file=path))
    no_ema = _save(tmp_path / "vssd_micro_best.pth", random_official_state_dict(TINY, seed=5))
    with pytest.raises(ValueError, match="EMA"):
        _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=no_ema, use_ema=True))


# ---------------------------------------------------------------------------------------------------
# Dense prediction: features_only, stage norms, mmseg/mmdet checkpoints, segmentation


def test_features_only_shapes_and_strides_at_odd_size():
    model = _tiny(features_only=True)
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 97, 130))
    for f, r in zip(feats, [4, 8, 16, 32]):
        assert f.shape[-2:] == (math.ceil(97 / r), math.ceil(130 / r))
    some = _tiny(features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in some(torch.randn(1, 3, 64, 64))] == [32, 128]


def test_dense_prediction_checkpoint_gives_official_features(tmp_path):
    backbone_sd = random_official_state_dict(TINY, seed=6, classifier=False, outnorms=True)
    path = tmp_path / "upernet_vssd_4xb4-160k_ade20k-512x512_tiny.pth"
    torch.save(as_mmseg_checkpoint(backbone_sd), path)
    model = _tiny(features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        feats = model(x)
    for ours, official in zip(feats, official_backbone_features(backbone_sd, x, TINY), strict=True):
        assert ours.shape == official.shape
        assert _close(ours, official)
    with pytest.raises(RuntimeError, match="features_only=True"):
        _tiny(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_classification_checkpoint_into_features_only(tiny_checkpoint):
    """Fresh stage norms (as the official dense-prediction training starts), everything else loaded."""
    path, model_sd, _ = tiny_checkpoint
    model = _tiny(features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    norms = model.model.feature_norms
    sd = dict(
        model_sd,
        **{f"outnorm{i}.{p}": getattr(norms[i], p).detach() for i in range(4) for p in ("weight", "bias")},
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, official in zip(model(x), official_backbone_features(sd, x, TINY), strict=True):
            assert _close(ours, official)


def test_segmentation_model_at_odd_size():
    from vmamba.seg import create_segmentation_model

    model = create_segmentation_model(
        "vssd_tiny", num_classes=5, decoder="upernet", aux_head=True, backbone_kwargs=TINY_ARGS, channels=32
    ).eval()
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        assert model(x).shape == (1, 5, 97, 130)
    logits, aux = model.train().forward_with_aux(x.expand(2, -1, -1, -1))  # BatchNorm: 2 images
    (logits.mean() + aux.mean()).backward()


def test_forward_intermediates():
    model = _tiny()
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [16, 32, 64, 128]
        last = model.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NHWC")
        assert last[0].shape == (1, 4, 5, 128) and torch.equal(last[0], inter[-1].permute(0, 2, 3, 1))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[1])
        normed = model.forward_intermediates(
            x, indices=[3], norm=True, intermediates_only=True, output_fmt="NHWC"
        )
        assert torch.equal(normed[0], final)


# ---------------------------------------------------------------------------------------------------
# timm API, training


def test_timm_api():
    model = _tiny(num_classes=7, drop_path_rate=0.1, img_size=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 3, 3, model.num_features)  # NHWC, as timm's Swin
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert model(x).shape == (2, 128)
        model.reset_classifier(5, "max")
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5

    no_wd = model.no_weight_decay()
    ssd_blocks = sum(TINY.depths[:3])
    assert "stages.0.blocks.0.mixer.A_log" in no_wd and "stages.2.blocks.0.mixer.dt_bias" in no_wd
    assert len(no_wd) == 3 * ssd_blocks
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + sum(TINY.depths) + 1  # stem, one per block, the unmatched head
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    a_log = model.stages[0].blocks[0].mixer.A_log
    assert all(g["weight_decay"] == 0 for g in optimizer.param_groups if any(p is a_log for p in g["params"]))


def test_grad_checkpointing_gives_identical_output_and_grads():
    model = _tiny(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    out2 = model(x)
    out2.sum().backward()
    assert torch.equal(out, out2)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_backward_reaches_every_parameter():
    model = _tiny(num_classes=42).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_outputs_and_grads_finite(dtype):
    model = _tiny(num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss = out.float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_vssd_tiny():
    """One graph (fullgraph=True: NC-SSD is plain torch ops), forward and backward."""
    model = timm.create_model("vssd_tiny", num_classes=10, drop_path_rate=0.0)
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert _max_diff(out, expected) <= 1e-5
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_onnx_export_vssd_tiny_matches_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = timm.create_model("vssd_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    path = str(tmp_path / "vssd_tiny.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["image"])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": x.numpy()})
    assert abs(out - expected.numpy()).max() <= 1e-5
