"""Scan directions: token orders, their inverses, and the one-call multi-direction scan."""

from __future__ import annotations

import pytest
import torch

from vmamba.kernels import (
    DIRECTIONS,
    VIM_DIRECTIONS,
    VMAMBA_DIRECTIONS,
    ScanBackend,
    available_backends,
    from_directions,
    multi_direction_selective_scan,
    selective_scan_reference,
    to_directions,
)
from vmamba.kernels import directions as directions_module
from vmamba.kernels.token_orders import canonical_directions


def test_orders_on_a_small_grid():
    grid = torch.arange(6.0).view(1, 1, 2, 3)  # rows [0 1 2], [3 4 5]
    seqs = to_directions(grid, VMAMBA_DIRECTIONS)[0, :, 0]
    assert seqs[0].tolist() == [0, 1, 2, 3, 4, 5]  # row-major
    assert seqs[1].tolist() == [0, 3, 1, 4, 2, 5]  # column-major
    assert seqs[2].tolist() == [5, 4, 3, 2, 1, 0]
    assert seqs[3].tolist() == [5, 2, 4, 1, 3, 0]
    one_d = to_directions(torch.arange(4.0).view(1, 1, 4), VIM_DIRECTIONS)[0, :, 0]
    assert one_d.tolist() == [[0, 1, 2, 3], [3, 2, 1, 0]]


@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (5, 4), (7, 7)])
def test_from_directions_inverts_to_directions(h, w):
    x = torch.randn(2, 3, h, w)
    seqs = to_directions(x, VMAMBA_DIRECTIONS)
    back = from_directions(seqs, VMAMBA_DIRECTIONS, (h, w), merge="none")
    for k in range(4):
        torch.testing.assert_close(back[:, k], x.flatten(2))
    torch.testing.assert_close(from_directions(seqs, VMAMBA_DIRECTIONS, (h, w)), 4 * x.flatten(2))
    torch.testing.assert_close(from_directions(seqs, VMAMBA_DIRECTIONS, (h, w), merge="mean"), x.flatten(2))


def test_direction_errors():
    with pytest.raises(ValueError, match="unknown scan direction"):
        to_directions(torch.randn(1, 2, 6), ["diagonal"])
    with pytest.raises(ValueError, match="needs grid_size"):
        to_directions(torch.randn(1, 2, 6), ["col"])
    with pytest.raises(ValueError, match="has 8 cells but L=6"):
        to_directions(torch.randn(1, 2, 6), ["row"], grid_size=(2, 4))
    with pytest.raises(ValueError, match="merge must be"):
        from_directions(torch.randn(1, 1, 2, 6), ["row"], merge="max")


def _direction_by_direction(u, delta, A, B, C, D, z, bias, directions, grid, merge):
    """Ground truth: materialise each direction's sequence and scan it on its own, in float64."""
    k = len(directions)
    ch = delta.shape[1] // k
    us = u if u.shape[1] == k * ch else u.repeat(1, k, 1)
    zs = z if z is None or z.shape[1] == k * ch else z.repeat(1, k, 1)
    gk = B.shape[1] // k
    outs = []
    for i, d in enumerate(directions):
        sl = slice(i * ch, (i + 1) * ch)

        def order(t, d=d):
            return to_directions(t, [d], grid)[:, 0]

        y = selective_scan_reference(
            order(us[:, sl]),
            order(delta[:, sl]),
            A[sl],
            order(B[:, i * gk : (i + 1) * gk].flatten(1, 2)).unflatten(1, (gk, -1)),
            order(C[:, i * gk : (i + 1) * gk].flatten(1, 2)).unflatten(1, (gk, -1)),
            D[sl],
            None if zs is None else order(zs[:, sl]),
            bias[sl],
            True,
        )
        outs.append(y)
    return from_directions(torch.stack(outs, 1), directions, grid, merge)


@pytest.mark.parametrize(
    "directions, grid, shared_u, merge",
    [
        (VIM_DIRECTIONS, None, True, "mean"),
        (VMAMBA_DIRECTIONS, (3, 5), True, "sum"),
        (VMAMBA_DIRECTIONS, (4, 4), False, "sum"),
        (("col", "row_reversed"), (2, 7), False, "mean"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_multi_direction_scan_matches_separate_scans(directions, grid, shared_u, merge, backend):
    torch.manual_seed(0)
    k, ch, n, length, batch = len(directions), 3, 4, 15 if grid is None else grid[0] * grid[1], 2
    kw = dict(dtype=torch.float64)
    u = torch.randn(batch, ch if shared_u else k * ch, length, **kw)
    delta = torch.randn(batch, k * ch, length, **kw) * 0.5
    A = -torch.rand(k * ch, n, **kw) - 0.1
    B, C = torch.randn(batch, k, n, length, **kw), torch.randn(batch, k, n, length, **kw)
    D, bias = torch.randn(k * ch, **kw), torch.randn(k * ch, **kw)
    z = torch.randn(batch, ch, length, **kw)
    leaves = [t.requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias)]
    got = multi_direction_selective_scan(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        bias,
        True,
        directions=directions,
        grid_size=grid,
        merge=merge,
        backend=backend,
    )
    expected = _direction_by_direction(u, delta, A, B, C, D, z, bias, directions, grid, merge)
    assert got.shape == (batch, ch, length)
    torch.testing.assert_close(got, expected)
    g1 = torch.autograd.grad(got.square().sum(), leaves)
    g2 = torch.autograd.grad(expected.square().sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_multi_direction_shape_errors():
    u = torch.randn(1, 3, 6)
    with pytest.raises(ValueError, match="delta must be"):
        multi_direction_selective_scan(
            u, torch.randn(1, 5, 6), torch.randn(6, 2), torch.randn(1, 2, 2, 6), torch.randn(1, 2, 2, 6),
            directions=VIM_DIRECTIONS,
        )  # fmt: skip
    with pytest.raises(ValueError, match="u must have 3 channels"):
        multi_direction_selective_scan(
            torch.randn(1, 4, 6), torch.randn(1, 6, 6), -torch.rand(6, 2), torch.randn(1, 2, 2, 6),
            torch.randn(1, 2, 2, 6), directions=VIM_DIRECTIONS,
        )  # fmt: skip


def test_canonical_directions():
    assert canonical_directions(("forward", "backward")) == ("row", "row_reversed")
    assert canonical_directions(VMAMBA_DIRECTIONS, (2, 2)) == DIRECTIONS
    with pytest.raises(ValueError, match="unknown scan direction 'up'"):
        canonical_directions(["up"])


def test_fused_hook_gets_canonical_names(monkeypatch):
    """A backend's multi_direction hook receives canonical names (and only checked merges)."""
    seen = {}

    def hook(u, *args, directions, grid_size, merge):
        seen.update(directions=directions, grid_size=grid_size, merge=merge)
        return u

    fused = ScanBackend("torch", None, None, lambda device: True, multi_direction=hook)
    monkeypatch.setattr(directions_module, "resolve_backend", lambda backend, device: fused)
    u, delta = torch.randn(1, 2, 6), torch.randn(1, 4, 6)
    A, B = -torch.rand(4, 1), torch.randn(1, 2, 1, 6)
    multi_direction_selective_scan(
        u, delta, A, B, B, directions=("forward", "col_reversed"), grid_size=(2, 3), merge="mean"
    )
    assert seen == {"directions": ("row", "col_reversed"), "grid_size": (2, 3), "merge": "mean"}
    with pytest.raises(ValueError, match="merge must be"):
        multi_direction_selective_scan(u, delta, A, B, B, directions=VIM_DIRECTIONS, merge="max")


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_low_rank_steps_equal_projected_steps_with_gradients(backend):
    """delta_proj_weight: the scan of projected steps, on every backend and through autograd."""
    if backend not in available_backends(torch.device("cpu")) and backend != "reference":
        pytest.skip(f"{backend} is not available here")
    g = torch.Generator().manual_seed(0)
    batch, channels, length, n, rank, k = 2, 6, 11, 3, 2, 2

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    u, z = rnd(batch, channels, length), rnd(batch, channels, length)
    x, w = rnd(batch, k * rank, length), rnd(k * channels, rank, scale=0.5)
    A = (-torch.rand(k * channels, n, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    B, C = rnd(batch, k, n, length), rnd(batch, k, n, length)
    D, bias = rnd(k * channels), rnd(k * channels, scale=0.1)
    common = dict(delta_softplus=True, directions=("forward", "backward"), merge="mean", backend=backend)
    got = multi_direction_selective_scan(u, x, A, B, C, D, z, bias, delta_proj_weight=w, **common)
    steps = torch.cat(
        [w[i * channels : (i + 1) * channels] @ x[:, i * rank : (i + 1) * rank] for i in range(k)], 1
    )
    want = multi_direction_selective_scan(u, steps, A, B, C, D, z, bias, **common)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    leaves = (u, x, w, A, B, C, D, z, bias)
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_low_rank_shapes_are_checked():
    u = torch.randn(1, 4, 5)
    with pytest.raises(ValueError, match="delta must be \\(batch, K\\*R, L\\)"):
        multi_direction_selective_scan(
            u,
            torch.randn(1, 5, 5),
            -torch.ones(8, 2),
            torch.randn(1, 2, 2, 5),
            torch.randn(1, 2, 2, 5),
            directions=("forward", "backward"),
            delta_proj_weight=torch.randn(8, 3),
        )
