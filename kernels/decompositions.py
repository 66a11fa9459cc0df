"""The scan ops written as ordinary aten ops, for exporters that decompose custom ops.

``vmamba::selective_scan`` and ``vmamba::ssd_scan`` stay out of torch's global decomposition table on
purpose: when the ``CI`` environment variable is set (as on every GitHub Actions runner), inductor refuses
to compile a graph that falls back to an op with an entry there ("make_fallback(...): a decomposition
exists"), so a registered decomposition would break ``torch.compile`` in every user's CI.

Two exporters need the decompositions:

- ``torch.export.export(model, args).run_decompositions(scan_decompositions())`` gives a graph of aten ops
  only (by default the exported program keeps each scan as one op, which runs wherever vmamba is imported);
- ``torch.onnx.export(..., dynamo=True)`` before torch 2.8 does not set ``torch.onnx.is_in_onnx_export()``,
  so the scans reach the exporter as custom ops; it decomposes ops through torch's global table, so run it
  inside ``with decompose_scans():``. From torch 2.8 the scans take their PyTorch path during ONNX export
  and need nothing. ``vmamba-export`` (:func:`vmamba.export.export_onnx`) does this on every version.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .selective_scan import scan_as_aten_ops
from .ssd import ssd_as_aten_ops

__all__ = ["decompose_scans", "scan_decompositions"]


def scan_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The scan custom ops mapped to their aten-op forms, as a table for ``run_decompositions``."""
    return {
        torch.ops.vmamba.selective_scan.default: scan_as_aten_ops,
        torch.ops.vmamba.ssd_scan.default: ssd_as_aten_ops,
    }


@contextlib.contextmanager
def decompose_scans() -> Iterator[None]:
    """Put the scans' decompositions in torch's global decomposition table for the ``with`` block only.

    For exporters that read that table (``torch.onnx.export(dynamo=True)`` before torch 2.8). Entries
    that were already there are left alone; those added are removed on exit, even after an error.
    """
    table = torch._decomp.decomposition_table
    added = {op: fn for op, fn in scan_decompositions().items() if op not in table}
    table.update(added)
    try:
        yield
    finally:
        for op, fn in added.items():
            if table.get(op) is fn:
                del table[op]
