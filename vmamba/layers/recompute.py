"""Selective recomputation: autograd keeps a recipe for one activation instead of the activation itself.

The activations of a Mamba mixer that are cheap to compute but large (the causal convolution's output,
(batch, L, 2E)) need not stay in memory from the forward to the backward: the consumers that save them for
their gradients (x_proj's GEMM, the scan) can get them recomputed when their backward runs. mamba_ssm's
``mamba_inner_fn`` does this by default (``checkpoint_lvl=1``) with a hand-written backward; here the
same effect comes from :func:`torch.autograd.graph.saved_tensors_hooks`, so every backend's own autograd
is used unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from vmamba.kernels.eager import is_tracing

__all__ = ["recompute_in_backward"]


class _Recipe:
    """What autograd saves instead of a view of the recomputed tensor: the view's geometry, and the shared
    state of :func:`recompute_in_backward` (the recompute function and the recomputed value)."""

    __slots__ = ("offset", "shape", "state", "stride")

    def __init__(self, state: dict, view: Tensor) -> None:
        self.state = state
        self.shape, self.stride, self.offset = view.shape, view.stride(), view.storage_offset()


class _Scope(threading.local):
    """This thread's stack of the tables of :func:`recompute_in_backward`'s hooks (storage key -> state),
    and whether the last probe reached one of them."""

    def __init__(self) -> None:
        self.tables: list[dict] = []
        self.probed = False


_SCOPE = _Scope()


@contextlib.contextmanager
def recompute_in_backward(tensor: Tensor, recompute: Callable[[], Tensor]) -> Iterator[None]:
    """Inside the block, autograd saves ``tensor`` (and every view of it) as a recipe: the backward calls
    ``recompute()`` (once per backward, shared by all the views; under the autocast state of the forward)
    and reads the views from its result, so ``tensor`` is not kept alive by the ops of the block.

    ``recompute`` must return a tensor equal to ``tensor``: same values, shape, dtype, device and
    (contiguous) layout; a mismatch raises a RuntimeError in the backward. Nothing happens (the block runs
    as usual) when no gradient is being recorded for ``tensor``, when it is not a contiguous tensor that
    owns its whole storage, or when a tracer, compiler or exporter is running. Double backward through the
    recomputed tensor is not supported (it is recomputed without a graph).

    Blocks nest: one inside another adds its tensor to the enclosing block's hooks (a Vim block recomputes
    its norm's output around the mixer, which recomputes its convolution output inside). Nothing happens
    inside a saved-tensor hooks context of someone else (``torch.utils.checkpoint``'s, as timm's
    ``set_grad_checkpointing`` uses it, or ``save_on_cpu``): those own what is saved, and the block's
    tensors would escape them.
    """
    if not _applies(tensor):
        yield
        return
    innermost = _innermost_hooks()
    if innermost == "other":
        yield
        return
    kind = tensor.device.type
    state = {
        "recompute": recompute,
        "value": None,
        "pending": 0,  # recipes packed and not yet unpacked: the value is dropped after the last
        "autocast": (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)),
        "expected": (tensor.shape, tensor.dtype, tensor.device),
    }
    # The hooks live as long as what they saved: they must not hold ``tensor`` itself. Matching by address
    # is safe: the caller holds ``tensor`` for the whole block, so no other tensor can have its storage.
    key = _key(tensor)
    if innermost == "ours":
        table = _SCOPE.tables[-1]
        if key in table:  # the same tensor twice: the outer block already recomputes it
            yield
            return
        table[key] = state
        try:
            yield
        finally:
            del table[key]
        return
    table = {key: state}

    def pack(saved: Tensor):
        _SCOPE.probed = True
        if isinstance(saved, Tensor):
            found = table.get(_key(saved))
            if found is not None:
                found["pending"] += 1
                return _Recipe(found, saved)
        return saved

    _SCOPE.tables.append(table)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _SCOPE.tables.pop()


def _key(t: Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.dtype, t.device


def _applies(tensor: Tensor) -> bool:
    return (
        isinstance(tensor, Tensor)
        and torch.is_grad_enabled()
        and tensor.requires_grad
        and not is_tracing()
        and tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


def _innermost_hooks() -> str:
    """Which default saved-tensor hooks are in force here: ``"none"``, ``"ours"`` (the innermost are those of
    an enclosing :func:`recompute_in_backward`) or ``"other"``. A probe op saves a tensor: our pack hook
    notes that it ran; other hooks make registering hooks on the saved tensor fail (documented behaviour
    of ``SavedTensor.register_hooks``)."""
    _SCOPE.probed = False
    # mul saves its other input, a plain tensor: nothing saved refers back to the graph, so the probe leaves
    # no reference cycle through the hooks (a saved output, as exp's, would keep the hooks' state alive).
    probe = torch.empty(0, requires_grad=True) * torch.empty(0)
    if _SCOPE.probed and _SCOPE.tables:
        return "ours"
    try:
        probe.grad_fn._raw_saved_other.register_hooks(_identity, _identity)
    except RuntimeError:
        return "other"
    return "none"


def _identity(x):
    return x


def _unpack(saved):
    if not isinstance(saved, _Recipe):
        return saved
    state = saved.state
    value = state["value"]
    if value is None:
        enabled, dtype = state["autocast"]
        device = state["expected"][2].type
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            value = state["recompute"]()
        if (value.shape, value.dtype, value.device) != state["expected"] or not value.is_contiguous():
            raise RuntimeError(
                "recompute_in_backward: the recomputed tensor is "
                f"{tuple(value.shape)} {value.dtype} on {value.device}"
                f"{'' if value.is_contiguous() else ' (not contiguous)'}, but the forward saved a contiguous "
                f"{tuple(state['expected'][0])} {state['expected'][1]} on {state['expected'][2]}"
            )
        state["value"] = value
    state["pending"] -= 1
    if state["pending"] <= 0:
        state["value"] = None  # every saved view has been read: let the recomputed tensor go
    return value.as_strided(saved.shape, saved.stride, saved.offset)
