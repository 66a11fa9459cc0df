"""Selective recomputation (vmamba.layers.recompute) and its use in Vim's mixer."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch

import vmamba.layers.mamba_mixer as mixer_module
from vmamba.layers import BiMambaMixer
from vmamba.layers.recompute import recompute_in_backward


def _toy(x: torch.Tensor, w: torch.Tensor, recompute: bool, calls: list | None = None):
    """u = silu(x) * 2 consumed by two ops that save it (a matmul and a mul); u recomputed or kept."""

    def make_u():
        if calls is not None:
            calls.append(1)
        return torch.nn.functional.silu(x) * 2

    u = make_u()
    ref = weakref.ref(u)
    with recompute_in_backward(u, make_u) if recompute else contextlib.nullcontext():
        y = (u @ w).sum() + (u * u.transpose(0, 1).contiguous().transpose(0, 1)).sum()
    return y, ref


def test_gradients_equal_and_the_tensor_is_not_kept():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    grads = []
    for recompute in (False, True):
        calls = []
        y, ref = _toy(x, w, recompute, calls)
        gc.collect()
        # Kept alive by the saved tensors of the graph only when not recomputed.
        assert (ref() is None) == recompute
        grads.append(torch.autograd.grad(y, (x, w)))
        # Recomputed once in the backward, for both consumers.
        assert len(calls) == (2 if recompute else 1)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_retain_graph_backward_twice():
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    y, _ = _toy(x, w, True)
    first = torch.autograd.grad(y, (x, w), retain_graph=True)
    second = torch.autograd.grad(y, (x, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatched_recompute_is_an_error():
    x = torch.randn(4, 4, requires_grad=True)
    u = x * 2
    with recompute_in_backward(u, lambda: (x * 2)[:2]):
        y = (u * u).sum()
    with pytest.raises(RuntimeError, match="recomputed tensor is"):
        y.backward()


def test_nothing_happens_without_a_gradient():
    x = torch.randn(3, 3)
    u = x * 2
    with recompute_in_backward(u, lambda: pytest.fail("recompute must not run")):
        y = u * 3
    torch.testing.assert_close(y, x * 6)


@pytest.mark.parametrize("outer", ["hooks", "checkpoint"])
def test_outer_saved_tensor_hooks_keep_control(outer):
    """Inside another saved-tensor hooks context (as torch.utils.checkpoint's, which timm's grad
    checkpointing uses) nothing is recomputed here: the outer hooks see every saved tensor, u included."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    calls, seen = [], []

    def block(x):
        y, ref = _toy(x, w, True, calls)
        seen.append(ref)
        return y

    if outer == "hooks":
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            y = block(x)
        gc.collect()
        assert seen[0]() is not None  # saved as a tensor through the outer hooks
    else:
        y = checkpoint(block, x, use_reentrant=False)
    grads = torch.autograd.grad(y, (x, w))
    # The forward ran once (twice under checkpoint, which reruns it); never as this module's recompute.
    assert len(calls) == (1 if outer == "hooks" else 2)
    want = torch.autograd.grad(_toy(x, w, False)[0], (x, w))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recompute_runs_under_the_forwards_autocast():
    seen = []
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def make_u():
        seen.append(torch.is_autocast_enabled("cpu"))
        return x @ w  # bfloat16 under CPU autocast

    with torch.autocast("cpu", torch.bfloat16):
        u = make_u()
        with recompute_in_backward(u, make_u):
            y = (u * u).float().sum()  # mul saves u itself (bfloat16)
    y.backward()
    assert seen == [True, True] and x.grad is not None


def _mixer_grads(mixer, hidden, recompute: bool):
    real = mixer_module.recompute_in_backward
    if not recompute:
        mixer_module.recompute_in_backward = lambda tensor, fn: contextlib.nullcontext()
    outputs = []
    real_conv = BiMambaMixer._conv

    def conv(self, x, out):
        u = real_conv(self, x, out)
        outputs.append(weakref.ref(u))
        return u

    try:
        BiMambaMixer._conv = conv
        mixer.zero_grad(set_to_none=True)
        h = hidden.detach().requires_grad_()
        y = mixer(h)
        gc.collect()
        kept = outputs[0]() is not None
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    finally:
        BiMambaMixer._conv = real_conv
        mixer_module.recompute_in_backward = real
    grads = {n: p.grad for n, p in mixer.named_parameters()}
    return kept, h.grad, grads, len(outputs)


def test_vim_mixer_recomputes_its_convolution_output():
    """Training keeps no (B, L, 2E) convolution output per mixer: the backward recomputes it (one more
    convolution), and every gradient is the same as with the output kept."""
    torch.manual_seed(0)
    mixer = BiMambaMixer(32)
    hidden = torch.randn(2, 37, 32)
    kept, dh, grads, convs = _mixer_grads(mixer, hidden, recompute=True)
    assert not kept and convs == 2
    kept_ref, dh_ref, grads_ref, convs_ref = _mixer_grads(mixer, hidden, recompute=False)
    assert kept_ref and convs_ref == 1
    torch.testing.assert_close(dh, dh_ref, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=0, msg=name)


def test_nested_blocks_share_the_outer_hooks():
    """A block inside another adds its tensor to the outer block's hooks: both tensors are released and
    recomputed once each, the same tensor twice is recomputed once, and the gradients are unchanged."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            return x * 3 if name == "a" else (x @ w) * 2  # ops that do not save their outputs

        return fn

    def run(recompute: bool):
        a = make("a")()
        refs = [weakref.ref(a)]
        outer = recompute_in_backward(a, make("a")) if recompute else contextlib.nullcontext()
        with outer:
            b = make("b")()
            refs.append(weakref.ref(b))
            with recompute_in_backward(b, make("b")) if recompute else contextlib.nullcontext():
                with recompute_in_backward(a, make("a")) if recompute else contextlib.nullcontext():
                    y = ((a * b) @ w).sum() + (b * b).sum()
            y = y + (a * a).sum()  # saved through the outer block's hooks only
        return y, refs

    y, refs = run(True)
    gc.collect()
    assert [r() for r in refs] == [None, None]
    got = torch.autograd.grad(y, (x, w))
    assert calls == {"a": 2, "b": 2}  # once in the forward, once in the backward
    want = torch.autograd.grad(run(False)[0], (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_other_hooks_inside_a_block_keep_control():
    """Saved-tensor hooks of someone else opened inside a block see the tensors saved there: a nested
    block adds nothing to the outer one's hooks then."""
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    a = torch.tanh(x)
    b = torch.sin(x)
    seen = []
    with recompute_in_backward(a, lambda: torch.tanh(x)):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            with recompute_in_backward(b, lambda: pytest.fail("b must not be recomputed")):
                y = (b * b).sum()
    assert any(t is b for t in seen)
    torch.testing.assert_close(torch.autograd.grad(y, x)[0], 2 * torch.sin(x) * torch.cos(x))


def test_training_steps_leave_nothing_alive():
    """Training a Vim model (a block's norm recompute around its mixer's convolution recompute) leaves no
    tensor alive from step to step: the probe that finds the enclosing block's hooks once tied them into a
    reference cycle that kept every block's recompute inputs (18 MiB a vim_tiny step at 512)."""
    import timm

    import vmamba  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32)
    x = torch.randn(1, 3, 32, 32)

    def live() -> int:
        gc.collect()
        # type() rather than isinstance(): isinstance on some module objects warns (torch.distributed).
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    for step in range(4):
        model(x).square().sum().backward()
        if step == 1:
            before = live()
    assert live() == before
