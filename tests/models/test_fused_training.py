"""Whole models trained through the CPU multi-direction hook's fused path give the generic path's gradients."""

import dataclasses

import pytest
import timm
import torch

import vmamba  # noqa: F401  (registers the models)
from vmamba.kernels import backends
from vmamba.kernels import cpu as cpu_backend

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vim_tiny_patch16_224", dict(depth=2, embed_dim=48, img_size=64)),
        ("vmamba_tiny_s1l8", dict(depths=(1, 1, 1, 1), dims=16)),
    ],
)
def test_fused_training_matches_generic_path(monkeypatch, name, kwargs):
    if not cpu_backend.cpu_library_available():
        pytest.skip("the C++ library cannot be built here")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()  # eval: no drop path, same forward twice
    x, w = torch.randn(2, 3, 64, 64), torch.randn(2, 5)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        (model(x) * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    real = cpu_backend._FusedScanFunction.apply
    monkeypatch.setattr(cpu_backend._FusedScanFunction, "apply", lambda *a: calls.append(1) or real(*a))
    fused = grads()
    assert calls, "the fused training path did not run"
    cpu = backends.resolve_backend("cpu", CPU)  # the generic path: the hook declines calls with gradients
    declining = dataclasses.replace(
        cpu,
        multi_direction=lambda *a, **kw: (
            NotImplemented if torch.is_grad_enabled() else cpu.multi_direction(*a, **kw)
        ),
    )
    monkeypatch.setitem(backends._REGISTRY, "cpu", declining)
    calls.clear()
    generic = grads()
    assert not calls
    assert fused.keys() == generic.keys()
    for n in generic:
        scale = max(generic[n].abs().max().item(), 1e-6)
        torch.testing.assert_close(fused[n], generic[n], rtol=1e-4, atol=1e-4 * scale, msg=n)
