"""TorchScript and torch.fx for every registered Vim and VMamba model, in the manner of timm's model tests.

timm's own tests script each model (built under ``set_scriptable``), trace it with torch.fx using timm's
registered leaves (``get_notrace_modules`` / ``get_notrace_functions``), run the traced graph forward and
backward, and script the traced graph. The same modes run here on small configurations of each
registered model (the architecture of the variant, narrow and shallow), each compared with the eager
model; then the fx feature wrapper, and the input-size check, which must survive both compilers.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm import set_scriptable
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import (
    NodePathTracer,
)

import vmamba  # noqa: F401  (registers the models)

MODEL_NAMES = timm.list_models(module="vim") + timm.list_models(module="vmamba")
TRACER_KWARGS = dict(
    leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
)


def _small_args(name: str) -> dict:
    """Each variant's architecture, narrow and shallow, and an input size it takes."""
    if name.startswith("vim_"):
        stride = 4 if "stride8" in name else 8  # the "+" models keep patches that overlap
        return dict(img_size=32, patch_size=8, stride=stride, embed_dim=32, depth=2)
    return dict(dims=16, depths=(1, 1, 1, 1))


def _input_size(name: str) -> tuple[int, int, int]:
    return (3, 32, 32) if name.startswith("vim_") else (3, 40, 56)  # VMamba: any size, here not square


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, drop_path_rate=0.0, **_small_args(name), **kwargs)


def _fx_model(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The model traced with timm's leaves (timm's tests go through torchvision's feature extractor,
    which traces the same way; the fx feature wrapper below does)."""
    tracer = NodePathTracer(**TRACER_KWARGS)
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph)


def test_every_model_is_covered():
    assert len(MODEL_NAMES) == 11, MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_torchscript(name):
    with set_scriptable(True):
        model = _create(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, *_input_size(name))
    with torch.no_grad():
        expected, out = model(x), scripted(x)
    assert out.shape == (2, 1000)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_forward_backward(name):
    """One trace: the eval forward gives the eager logits, the train backward the eager gradients."""
    model = _create(name, num_classes=42)
    traced = _fx_model(model)
    x = torch.randn(2, *_input_size(name))
    with torch.inference_mode():
        model.eval(), traced.eval()
        assert torch.equal(traced(x), model(x))

    model.train(), traced.train()
    model(x).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = traced(x)
    out.mean().backward()
    assert out.shape == (2, 42)
    grads = dict(traced.named_parameters())
    assert sum(p.numel() for p in grads.values()) == sum(p.numel() for p in model.parameters())
    for n, p in grads.items():
        assert p.grad is not None, f"no gradient for {n}"
        torch.testing.assert_close(p.grad, expected[n], msg=n)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_fx_torchscript(name):
    with set_scriptable(True):
        model = _create(name).eval()
    scripted = torch.jit.script(_fx_model(model))
    x = torch.randn(1, *_input_size(name))
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


def test_fx_features_torchscript():
    """VMamba: features_only with the fx wrapper gives the stage outputs and scripts."""
    with set_scriptable(True):
        fx_features = _create("vmamba_tiny_s1l8", features_only=True, feature_cls="fx").eval()
    model = _create("vmamba_tiny_s1l8").eval()
    assert fx_features.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 40, 56)
    with torch.inference_mode():
        expected = model.forward_intermediates(x, intermediates_only=True)
        eager_out = fx_features(x)
        scripted_out = torch.jit.script(fx_features)(x)
    assert isinstance(scripted_out, list) and len(scripted_out) == 4
    for a, b, c in zip(expected, eager_out, scripted_out):
        assert a.shape[1] in (16, 32, 64, 128)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_fx_features_refusals():
    with pytest.raises(ValueError, match="feature_norms"):
        _create("vmamba_tiny_s1l8", features_only=True, feature_cls="fx", feature_norms=True)
    with pytest.raises(ValueError, match="token sequences"):
        _create("vim_tiny_patch16_224", features_only=True, feature_cls="fx")


def test_input_size_check_survives_tracing_and_scripting():
    """A wrong input size is a clear error in eager mode, and still one after fx or TorchScript."""
    with set_scriptable(True):
        model = _create("vim_tiny_patch16_224").eval()
    wrong, tiny = torch.randn(1, 3, 48, 32), torch.randn(1, 3, 4, 4)
    message = r"input size \(48, 32\) does not match the model's img_size \(32, 32\)"
    with pytest.raises(ValueError, match=message):
        model(wrong)
    with pytest.raises(ValueError, match=message):
        _fx_model(model)(wrong)
    with pytest.raises(torch.jit.Error, match=message):
        torch.jit.script(model)(wrong)
    dynamic = _create("vim_tiny_patch16_224", dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match="smaller than the patch size"):
        dynamic(tiny)


def test_dynamic_img_size_traces_and_scripts():
    """dynamic_img_size: the resampling is an fx leaf and a Python call in TorchScript; other sizes work."""
    model = _create("vim_tiny_patch16_224", dynamic_img_size=True).eval()
    traced, scripted = _fx_model(model), torch.jit.script(model)
    with torch.inference_mode():
        for size in ((32, 32), (48, 40)):
            x = torch.randn(1, 3, *size)
            expected = model(x)
            assert torch.equal(traced(x), expected)
            torch.testing.assert_close(scripted(x), expected, rtol=0, atol=0)
