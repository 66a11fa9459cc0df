"""The scan ops' aten-op forms: kept out of torch's global decomposition table (inductor refuses to fall back
to an op with an entry there when ``CI`` is set), handed to the exporters that ask for them."""

import pytest
import torch

import vmamba  # noqa: F401  (registers the models, which import every op)
from vmamba.kernels import decompose_scans, multi_direction_ssd_scan, scan_decompositions, selective_scan

SCAN_OPS = (torch.ops.vmamba.selective_scan.default, torch.ops.vmamba.ssd_scan.default)
OLD_ONNX_EXPORTER = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 8)


class _Scans(torch.nn.Module):
    """One gated selective scan and one two-direction SSD scan, each through its custom op."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(-torch.rand(8, 4) - 0.1)
        self.D = torch.nn.Parameter(torch.ones(8))
        self.A_ssd = torch.nn.Parameter(-torch.linspace(0.5, 2.0, 4))

    def forward(self, u, delta, B, C, z, x, dt, Bs, Cs):
        y = selective_scan(u, delta, self.A, B, C, self.D, z, None, True)
        s = multi_direction_ssd_scan(
            x, dt, self.A_ssd, Bs, Cs, directions=("row", "row_reversed"), chunk_size=16
        )
        return y.sum(1) + s.sum((2, 3))


def _args():
    gen = torch.Generator().manual_seed(0)
    shapes = (
        (2, 8, 21),
        (2, 8, 21),
        (2, 4, 21),
        (2, 4, 21),
        (2, 8, 21),
        (2, 21, 4, 8),
        (2, 21, 4),
        (2, 21, 2, 16),
        (2, 21, 2, 16),
    )
    return tuple(torch.randn(*s, generator=gen) for s in shapes)


def _vmamba_targets(graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "call_function" and "vmamba" in str(n.target)]


def test_the_ops_are_not_in_torchs_decomposition_table():
    """What inductor checks before it falls back to an op (``get_decompositions([op])``); an entry there
    makes ``torch.compile`` fail under ``CI=1``."""
    assert torch._decomp.get_decompositions(list(SCAN_OPS)) == {}


def test_decompose_scans_adds_them_for_the_block_only():
    with decompose_scans():
        assert set(torch._decomp.get_decompositions(list(SCAN_OPS))) == set(SCAN_OPS)
    assert torch._decomp.get_decompositions(list(SCAN_OPS)) == {}
    with pytest.raises(RuntimeError, match="inside"):
        with decompose_scans():
            raise RuntimeError("inside")
    assert torch._decomp.get_decompositions(list(SCAN_OPS)) == {}


def test_run_decompositions_gives_aten_ops_only():
    module, args = _Scans().eval(), _args()
    program = torch.export.export(module, args)
    assert len(_vmamba_targets(program.graph)) == 2
    decomposed = program.run_decompositions(scan_decompositions())
    assert _vmamba_targets(decomposed.graph) == []
    torch.testing.assert_close(decomposed.module()(*args), module(*args), rtol=1e-5, atol=1e-5)


def test_inductor_compiles_the_ops_under_ci(monkeypatch):
    """``CI`` set (as on GitHub Actions): inductor falls back to both ops and matches eager."""
    import torch._inductor.config

    monkeypatch.setenv("CI", "1")
    module, args = _Scans().eval(), _args()
    torch._dynamo.reset()
    # Without its caches inductor lowers the graph again, which is where it checks the fallbacks.
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        torch.testing.assert_close(torch.compile(module)(*args), module(*args), rtol=1e-5, atol=1e-5)


def _onnx_matches(module, args, path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.onnx.export(module, args, str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), module(*args), rtol=1e-4, atol=1e-4)


def test_onnx_export_inside_decompose_scans(tmp_path):
    """The way that works on every supported torch (``vmamba-export`` takes it)."""
    module, args = _Scans().eval(), _args()
    with decompose_scans():
        _onnx_matches(module, args, tmp_path / "scans.onnx")


@pytest.mark.skipif(OLD_ONNX_EXPORTER, reason="before torch 2.8 the exporter needs decompose_scans()")
def test_onnx_export_needs_nothing_from_torch_2_8(tmp_path):
    module, args = _Scans().eval(), _args()
    _onnx_matches(module, args, tmp_path / "scans.onnx")
