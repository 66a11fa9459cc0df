"""Tests of the Vim family: timm behaviour, official-checkpoint fidelity, export."""

from __future__ import annotations

import math
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from official_vim import (
    official_forward,
    official_mixer,
    random_official_state_dict,
    save_official_checkpoint,
)
from timm.layers import resample_abs_pos_embed
from timm.optim import create_optimizer_v2

import vmamba  # noqa: F401  (registers the models)
from vmamba.kernels import decompose_scans
from vmamba.layers import BiMambaMixer, RMSNorm, mamba_mixer
from vmamba.models import vim as vim_module
from vmamba.models.vim import Vim, checkpoint_filter_fn, default_out_indices, resample_pos_embed

VARIANTS = {
    "vim_tiny_patch16_224": 7_148_008,
    "vim_small_patch16_224": 25_796_584,
    "vim_base_patch16_224": 97_598_440,
    "vim_tiny_patch16_stride8_224": 7_250_344,
    "vim_small_patch16_stride8_224": 26_001_256,
}

# A small configuration of the same architecture: 4x4 = 16 patches (class token at index 8).
SMALL = dict(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2)
# Overlapping patches: 7x7 = 49 patches (odd, class token at index 24).
SMALL_STRIDE = dict(img_size=32, patch_size=8, stride=4, embed_dim=32, depth=2)


def small_vim(**kwargs) -> Vim:
    return timm.create_model("vim_tiny_patch16_224", **{**SMALL, "num_classes": 10, **kwargs})


def official_sd(cfg: dict, num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_official_state_dict(
        cfg["embed_dim"],
        cfg["depth"],
        cfg["img_size"],
        cfg["patch_size"],
        cfg["stride"],
        num_classes,
        seed=seed,
    )


def load_official(path, cfg: dict, num_classes: int = 10, **overlay) -> Vim:
    """Our model with an official checkpoint file loaded through timm's pretrained path."""
    return timm.create_model(
        "vim_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes, **overlay),
        **{**cfg, "num_classes": num_classes},
    ).eval()


# --- registration, sizes, init ----------------------------------------------------------------------


def test_registered_with_timm():
    for name in VARIANTS:
        assert timm.is_model(name)
    assert set(VARIANTS) <= set(timm.list_models(module="vim"))
    cfg = timm.models.get_pretrained_cfg("vim_small_patch16_stride8_224")
    assert cfg.hf_hub_id == "hustvl/Vim-small-midclstok"
    assert cfg.hf_hub_filename == "vim_s+_midclstok_ft_81p6acc.pth"
    assert cfg.first_conv == "patch_embed.proj" and cfg.classifier == "head"
    assert cfg.paper_ids == "arXiv:2401.09417" and cfg.license == "apache-2.0"
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.crop_pct == 0.875


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_equals_official(name):
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == VARIANTS[name]
    block = model.blocks[0].mixer
    dim = model.embed_dim
    assert (block.d_inner, block.d_state, block.d_conv, block.dt_rank) == (
        2 * dim,
        16,
        4,
        math.ceil(dim / 16),
    )
    assert len(model.blocks) == 24
    stride = 8 if "stride8" in name else 16
    assert model.pos_embed.shape == (1, ((224 - 16) // stride + 1) ** 2 + 1, dim)


def test_official_initialisation():
    torch.manual_seed(0)
    model = small_vim()
    mixer = model.blocks[0].mixer
    log_n = torch.log(torch.arange(1, 17, dtype=torch.float32))
    for a in (mixer.A_log, mixer.A_b_log):
        assert a.dtype == torch.float32 and torch.equal(a, log_n.expand_as(a))
    assert torch.equal(mixer.D, torch.ones_like(mixer.D)) and torch.equal(
        mixer.D_b, torch.ones_like(mixer.D_b)
    )
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.std() > 0
    assert torch.equal(mixer.dt_proj_b.bias, torch.zeros_like(mixer.dt_proj_b.bias))  # official default
    assert mixer.dt_proj.weight.abs().max() <= mixer.dt_rank**-0.5
    # out_proj scaled by 1/sqrt(depth): bound of kaiming_uniform(a=sqrt 5) is 1/sqrt(fan_in).
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(mixer.d_inner) / math.sqrt(2) + 1e-7
    assert torch.equal(model.head.bias, torch.zeros_like(model.head.bias))

    symmetric = small_vim(symmetric_dt_init=True).blocks[0].mixer
    dt_b = F.softplus(symmetric.dt_proj_b.bias)
    assert dt_b.min() >= 1e-3 * 0.999 and dt_b.max() <= 0.1 * 1.001
    assert symmetric.dt_proj_b.weight.abs().max() <= symmetric.dt_rank**-0.5


def test_drop_path_schedule():
    model = timm.create_model("vim_tiny_patch16_224", device="meta", drop_path_rate=0.3, depth=4)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_rmsnorm_matches_definition():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    xf = x.double()
    expected = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


# --- fidelity with the official model -----------------------------------------------------------------


def test_mixer_matches_official_two_scans():
    """The one-call bidirectional mixer equals two separate official scans (one on the flipped xz)."""
    torch.manual_seed(0)
    sd = random_official_state_dict(24, 1, 16, 8, 8, 5, seed=3)
    mixer = BiMambaMixer(24)
    prefix = "layers.0.mixer."
    mixer.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
    x = torch.randn(2, 11, 24)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), official_mixer(x, sd, prefix), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [SMALL, SMALL_STRIDE], ids=["stride8", "overlapping"])
def test_official_checkpoint_same_logits(tmp_path, cfg):
    sd, ema = official_sd(cfg, seed=1), official_sd(cfg, seed=2)
    path = tmp_path / "vim_official.pth"
    save_official_checkpoint(path, sd, ema)
    with pytest.raises(pickle.UnpicklingError):  # the pickled argparse args fail a plain weights_only load
        torch.load(path, weights_only=True)

    model = load_official(path, cfg)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = model(x), official_forward(sd, x, cfg["stride"])
        assert (ours - reference).abs().max().item() <= 1e-4
        # 'model' is loaded by default (what the official evaluation scores), EMA on request.
        assert (ours - official_forward(ema, x, cfg["stride"])).abs().max() > 1e-2
        ema_model = load_official(path, cfg, use_ema=True)
        assert (ema_model(x) - official_forward(ema, x, cfg["stride"])).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_official_checkpoint_same_logits_vim_tiny_224(tmp_path):
    sd = random_official_state_dict(192, 24, 224, 16, 16, 1000, seed=0)
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    save_official_checkpoint(path, sd, sd)
    model = timm.create_model(
        "vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - official_forward(sd, x, 16)).abs().max().item()
    assert diff <= 1e-4


def test_hub_style_envelope_and_lightning_checkpoint(tmp_path):
    """The filter unwraps a raw official envelope (timm's hub path) and our Lightning checkpoints."""
    sd = official_sd(SMALL)
    model = small_vim().eval()
    converted = checkpoint_filter_fn({"model": sd, "model_ema": None, "epoch": 3}, model)
    model.load_state_dict(converted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = official_forward(sd, x, 8)
        assert (model(x) - expected).abs().max() <= 1e-4

    lightning = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model_name": "vim_tiny_patch16_224"},
        "epoch": 1,
    }
    path = tmp_path / "last.ckpt"
    torch.save(lightning, path)
    loaded = load_official(path, SMALL)
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max() <= 1e-4


def test_other_img_size_resamples_checkpoint(tmp_path):
    sd = official_sd(SMALL)
    path = tmp_path / "vim.pth"
    save_official_checkpoint(path, sd)
    model = load_official(path, {**SMALL, "img_size": 48})  # 6x6 grid from a 4x4 checkpoint
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 37, 32)
    # Done around the middle class token: its entry moves from index 8 to 18, the grid is resampled.
    torch.testing.assert_close(pos[:, 18], sd["pos_embed"][:, 8])
    old_grid = torch.cat([sd["pos_embed"][:, :8], sd["pos_embed"][:, 9:]], dim=1)
    new_grid = resample_abs_pos_embed(old_grid, (6, 6), (4, 4), num_prefix_tokens=0)
    torch.testing.assert_close(torch.cat([pos[:, :18], pos[:, 19:]], dim=1), new_grid)

    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = official_forward({**sd, "pos_embed": pos}, x, 8)
        assert (model(x) - expected).abs().max() <= 1e-4


def test_dynamic_img_size_non_square():
    torch.manual_seed(0)
    sd = official_sd(SMALL)
    model = small_vim(dynamic_img_size=True).eval()
    model.load_state_dict(checkpoint_filter_fn(sd, model))
    fixed = small_vim().eval()
    fixed.load_state_dict(checkpoint_filter_fn(sd, fixed))
    x = torch.randn(2, 3, 40, 56)  # 5x7 grid, 35 patches, class token at index 17
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 36, 32)
        pos = resample_pos_embed(sd["pos_embed"], (5, 7), (4, 4))
        torch.testing.assert_close(pos[:, 17], sd["pos_embed"][:, 8])
        assert (model(x) - official_forward({**sd, "pos_embed": pos}, x, 8)).abs().max() <= 1e-4
        # At the build size the dynamic model is the fixed one.
        x32 = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x32), fixed(x32))
        features = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert [f.shape for f in features] == [(2, 32, 5, 7)] * 2
    with pytest.raises(ValueError, match="dynamic_img_size"):
        fixed(x)


def test_class_token_free_model_loads_official_checkpoint():
    sd = official_sd(SMALL)
    model = small_vim(class_token=False).eval()
    assert model.global_pool == "avg" and model.num_prefix_tokens == 0
    converted = checkpoint_filter_fn(sd, model)
    assert "cls_token" not in converted and converted["pos_embed"].shape == (1, 16, 32)
    torch.testing.assert_close(converted["pos_embed"][:, 8], sd["pos_embed"][:, 9])
    model.load_state_dict(converted)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_mismatched_checkpoint_raises_naming_keys(tmp_path):
    path = tmp_path / "deeper.pth"
    save_official_checkpoint(path, official_sd({**SMALL, "depth": 3}))
    with pytest.raises(RuntimeError, match=r"blocks\.2\.mixer\.in_proj\.weight"):
        load_official(path, SMALL)

    wider = official_sd({**SMALL, "embed_dim": 48})
    with pytest.raises(RuntimeError, match=r"(?s)shape mismatches.*blocks\.0\.norm\.weight"):
        checkpoint_filter_fn(wider, small_vim())

    extra = {**official_sd(SMALL), "rope.freqs_cos": torch.zeros(4)}
    missing = {k: v for k, v in official_sd(SMALL).items() if k != "layers.1.mixer.D_b"}
    # Even with another num_classes (where timm loads non-strictly) nothing is dropped silently.
    with pytest.raises(RuntimeError, match=r"(?s)unexpected keys.*rope\.freqs_cos"):
        checkpoint_filter_fn(extra, small_vim(num_classes=3))
    with pytest.raises(RuntimeError, match=r"(?s)missing keys.*blocks\.1\.mixer\.D_b"):
        checkpoint_filter_fn(missing, small_vim(num_classes=3))


def test_head_and_input_channels_adapted_on_load(tmp_path):
    sd = official_sd(SMALL)
    path = tmp_path / "vim.pth"
    save_official_checkpoint(path, sd)
    model = timm.create_model(
        "vim_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        **SMALL,
        num_classes=4,
        in_chans=1,
    )
    assert model.head.out_features == 4 and model.patch_embed.proj.in_channels == 1
    torch.testing.assert_close(model.blocks[1].mixer.A_b_log, sd["layers.1.mixer.A_b_log"])
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4)


# --- timm API -----------------------------------------------------------------------------------------


def test_head_pooling_and_classifier_api():
    torch.manual_seed(0)
    model = small_vim().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 17, 32)
        pooled = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, tokens[:, 8])
        torch.testing.assert_close(model.forward_head(tokens), model.head(tokens[:, 8]))
        assert model.get_classifier() is model.head
        model.reset_classifier(0)
        assert model(x).shape == (2, 32)
        model.reset_classifier(5, "avg")
        patches = torch.cat([tokens[:, :8], tokens[:, 9:]], dim=1)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), patches.mean(1))
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 17, 32)
    assert small_vim(num_classes=0, global_pool="max")(x).shape == (2, 32)
    with pytest.raises(ValueError, match="global_pool"):
        small_vim(global_pool="mean")


def test_no_weight_decay_and_layer_decay_groups():
    model = small_vim()
    nwd = model.no_weight_decay()
    expected = {"pos_embed", "cls_token"} | {
        f"blocks.{i}.mixer.{n}" for i in range(2) for n in ("A_log", "A_b_log", "D", "D_b")
    }
    assert nwd == expected
    names = dict(model.named_parameters())
    assert nwd <= set(names)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name in ("blocks.1.mixer.A_log", "blocks.0.mixer.A_b_log", "pos_embed", "cls_token"):
        assert id(names[name]) in no_decay
    assert id(names["blocks.0.mixer.in_proj.weight"]) not in no_decay
    assert len({g["lr_scale"] for g in opt.param_groups}) == 4  # stem, 2 blocks, head/norm


def test_grad_checkpointing_identical():
    torch.manual_seed(0)
    model = small_vim(drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())  # every parameter is used
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    assert torch.equal(out, out_ckpt)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=0, rtol=0)
    _, inter = model.forward_intermediates(x)
    model.set_grad_checkpointing(False)
    _, inter_plain = model.forward_intermediates(x)
    for a, b in zip(inter, inter_plain):
        assert torch.equal(a, b)


def test_features_only_default_indices_and_shapes():
    assert default_out_indices(24) == (5, 11, 17, 23)
    assert default_out_indices(12) == (2, 5, 8, 11)
    model = timm.create_model("vim_tiny_patch16_224", features_only=True, embed_dim=32, img_size=64)
    assert model.feature_info.channels() == [32] * 4
    assert model.feature_info.reduction() == [16] * 4
    assert [i["module"] for i in model.feature_info.get_dicts()] == [f"blocks.{i}" for i in (5, 11, 17, 23)]
    assert len(model.model.blocks) == 24  # pruned after block 23 (the last)
    features = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in features] == [(1, 32, 4, 4)] * 4

    plus = timm.create_model(
        "vim_tiny_patch16_stride8_224",
        features_only=True,
        out_indices=(0, 1),
        embed_dim=32,
        img_size=32,
        depth=3,
    )
    assert plus.feature_info.reduction() == [8, 8] and len(plus.model.blocks) == 2
    assert [f.shape for f in plus(torch.randn(2, 3, 32, 32))] == [(2, 32, 3, 3)] * 2


def test_forward_intermediates_remove_middle_class_token():
    torch.manual_seed(0)
    model = small_vim().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True)
        torch.testing.assert_close(final, model.forward_features(x))
        tokens = model.blocks[0](model._embed(x))  # the residual stream after block 0
        spatial, cls = inter[0]
        torch.testing.assert_close(cls, tokens[:, 8:9])
        patches = torch.cat([tokens[:, :8], tokens[:, 9:]], dim=1)
        torch.testing.assert_close(spatial, patches.reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
        nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True, intermediates_only=True)
        torch.testing.assert_close(nlc[0], torch.cat([final[:, :8], final[:, 9:]], dim=1))
    kept = model.prune_intermediate_layers([0])
    assert kept == [0] and len(model.blocks) == 1 and isinstance(model.head, torch.nn.Identity)


# --- precision, compile, export -------------------------------------------------------------------------


def test_bf16_autocast_finite_outputs_and_grads():
    torch.manual_seed(0)
    model = small_vim()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        tokens = model.forward_features(x)
    assert torch.isfinite(out).all() and tokens.dtype == torch.float32  # residual stream in fp32
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autocast_matches_fp32(dtype):
    torch.manual_seed(0)
    model = small_vim().cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    reference = model(x)
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.1)


def test_torch_compile_traces_forward_and_backward():
    """Dynamo traces the model (the scan is one custom op with a fake and a backward); cheap backend."""
    torch.manual_seed(0)
    model = small_vim()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = model(x)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_inductor_vim_tiny_224(monkeypatch):
    monkeypatch.setenv("CI", "1")  # as on GitHub Actions, where inductor is stricter about fallbacks
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-4, rtol=1e-4)


def _onnx_round_trip(model: torch.nn.Module, x: torch.Tensor, path, optimize: bool = True) -> float:
    """Export ``model`` with the dynamo ONNX exporter, run it in onnxruntime, return max |difference|."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with torch.no_grad():
        expected = model(x)
    with decompose_scans():  # needed before torch 2.8 (docs/kernels.md)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            optimize=optimize,
            input_names=["image"],
            output_names=["logits"],
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})
    return float((torch.from_numpy(got) - expected).abs().max())


def test_onnx_export_small(tmp_path):
    torch.manual_seed(0)
    model = small_vim().eval()
    assert _onnx_round_trip(model, torch.randn(1, 3, 32, 32), tmp_path / "vim_small.onnx") <= 1e-4


@pytest.mark.slow
def test_onnx_export_vim_tiny_224(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224").eval()
    # onnxscript's graph optimiser is superlinear in the graph size (~10 min for 24 blocks on 2 cores,
    # against ~1 min without it); onnxruntime optimises the graph itself when it loads it.
    x = torch.randn(1, 3, 224, 224)
    assert _onnx_round_trip(model, x, tmp_path / "vim_tiny.onnx", optimize=False) <= 1e-4


def test_inference_shares_mixer_buffers_per_forward(monkeypatch):
    """In CPU inference the mixers write their in_proj and convolution outputs into one buffer each per
    forward (freed after it); the logits are those of mixers that allocate their own, and training never
    shares them."""
    torch.manual_seed(0)
    model = small_vim(drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    buffers = {"in_proj": [], "conv": []}
    real = mamba_mixer._shared_buffer

    def recorded(name, *args):
        buffer = real(name, *args)
        buffers[name].append(None if buffer is None else buffer.data_ptr())
        return buffer

    def clear():
        for calls in buffers.values():
            calls.clear()

    monkeypatch.setattr(mamba_mixer, "_shared_buffer", recorded)
    with torch.no_grad():
        shared = model(x)
        for calls in buffers.values():
            assert len(calls) == len(model.blocks) and calls[0] is not None and len(set(calls)) == 1
        assert buffers["in_proj"][0] != buffers["conv"][0]
        assert mamba_mixer._BUFFERS.tensors == {}  # freed after the blocks
        monkeypatch.setattr(vim_module, "share_mixer_buffers", lambda shared: None)
        clear()
        own = model(x)
        assert all(calls == [None] * len(model.blocks) for calls in buffers.values())
    torch.testing.assert_close(shared, own, rtol=0, atol=0)
    model.train()
    monkeypatch.setattr(vim_module, "share_mixer_buffers", mamba_mixer.share_mixer_buffers)
    clear()
    model(x).sum().backward()
    assert all(calls == [None] * len(model.blocks) for calls in buffers.values())


def test_mixers_run_in_one_call_in_cpu_inference(monkeypatch):
    """In float32 CPU inference each mixer's convolutions, x_proj GEMMs and scans are one library call
    (cpu_vim_mixer), with the output of the separate ops; with gradients recorded, or another scan backend
    asked for, the separate ops run."""
    from vmamba.kernels import BACKEND_ENV_VAR
    from vmamba.kernels.cpu import cpu_library_available

    if not cpu_library_available():
        pytest.skip("the C++ library cannot be built here")
    torch.manual_seed(0)
    model = small_vim(drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = mamba_mixer.cpu_vim_mixer
    monkeypatch.setattr(mamba_mixer, "cpu_vim_mixer", lambda *args: calls.append(1) or real(*args))
    model(x)  # gradients recorded: the separate ops
    assert calls == []
    with torch.no_grad():
        one_call = model(x)
        assert len(calls) == len(model.blocks)
        monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
        calls.clear()
        on_torch = model(x)
        assert calls == []
        monkeypatch.delenv(BACKEND_ENV_VAR)
        monkeypatch.setattr(BiMambaMixer, "_mix_in_one_call", lambda self, x, z, u: None)
        separate = model(x)
    torch.testing.assert_close(one_call, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on_torch, separate, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_shared_in_proj_buffer_keeps_bias_and_hooks(monkeypatch, bias):
    """The shared in_proj path computes in_proj's output itself: it adds a bias, and an in_proj with a
    forward hook is still called as a module (its hook runs, its output is the same)."""
    torch.manual_seed(0)
    model = small_vim(drop_path_rate=0.0).eval()
    if bias:
        for block in model.blocks:
            proj = block.mixer.in_proj
            block.mixer.in_proj = torch.nn.Linear(proj.in_features, proj.out_features, bias=True)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = mamba_mixer._shared_buffer
    monkeypatch.setattr(mamba_mixer, "_shared_buffer", lambda name, *a: calls.append(name) or real(name, *a))
    with torch.no_grad():
        shared = model(x)
        assert calls.count("in_proj") == len(model.blocks)
        seen = []
        model.blocks[1].mixer.in_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        calls.clear()
        hooked = model(x)
        assert calls.count("in_proj") == len(model.blocks) - 1  # the hooked in_proj runs as a module
        monkeypatch.setattr(vim_module, "share_mixer_buffers", lambda shared: None)
        own = model(x)
    assert seen == [(2, model.patch_embed.num_patches + 1, model.blocks[1].mixer.in_proj.out_features)] * 2
    torch.testing.assert_close(shared, own)
    torch.testing.assert_close(hooked, own)


@pytest.mark.parametrize("autocast", [False, True])
def test_blocks_recompute_their_norm_output(monkeypatch, autocast):
    """Training keeps no norm output per block: in_proj's saved input is recomputed from the residual
    stream in the backward (under autocast the cast to bfloat16 is made before in_proj, and recomputed).
    The mixers still recompute their convolution outputs inside (nested), and the gradients are those of
    blocks that keep everything."""
    import contextlib
    import gc
    import weakref

    torch.manual_seed(0)
    model = small_vim(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    real_recompute, real_conv = vim_module.recompute_in_backward, BiMambaMixer._conv

    def run(recompute: bool):
        normed, convs, norms = [], [], []

        def spy(tensor, fn):
            normed.append(weakref.ref(tensor))
            counted = lambda: norms.append(1) or fn()  # noqa: E731
            return real_recompute(tensor, counted) if recompute else contextlib.nullcontext()

        def conv(self, x, out):
            convs.append(1)
            return real_conv(self, x, out)

        monkeypatch.setattr(vim_module, "recompute_in_backward", spy)
        monkeypatch.setattr(BiMambaMixer, "_conv", conv)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits = model(x)
        gc.collect()
        kept = [r() is not None for r in normed]
        forward_convs = len(convs)
        logits.float().square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert len(norms) == (len(model.blocks) if recompute else 0)  # once per block, in the backward
        return kept, forward_convs, len(convs), grads

    kept, forward_convs, convs, grads = run(True)
    blocks = len(model.blocks)
    assert kept == [False] * blocks
    assert forward_convs == blocks and convs == 2 * blocks  # the nested recompute still runs
    kept_ref, _, _, grads_ref = run(False)
    assert kept_ref == [True] * blocks
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_autocast_blocks_keep_no_norm_output(monkeypatch):
    """On CUDA under bf16 autocast (Triton norm, conv and scan), a training forward keeps one (B, L, D)
    bfloat16 norm output per block less than with the recompute off, and the gradients stay close."""
    import contextlib

    torch.manual_seed(0)
    model = small_vim(drop_path_rate=0.0).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    real = vim_module.recompute_in_backward

    def run(recompute: bool):
        fn = real if recompute else (lambda tensor, f: contextlib.nullcontext())
        monkeypatch.setattr(vim_module, "recompute_in_backward", fn)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        kept = torch.cuda.memory_allocated() - before
        out.float().square().mean().backward()
        return kept, {n: p.grad.float().clone() for n, p in model.named_parameters()}

    kept, grads = run(True)
    kept_ref, grads_ref = run(False)
    tokens, dim = model.patch_embed.num_patches + 1, model.embed_dim
    assert kept_ref - kept >= len(model.blocks) * 4 * tokens * dim * 2  # bfloat16 (B, L, D) per block
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=2e-2, atol=2e-3, msg=name)
