"""The one prediction writer: clash-free names and one table schema for vmamba-predict and train.py predict."""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from vmamba.tasks import PredictionWriter
from vmamba.writers import OutputNamer, read_results, result_columns, result_record, write_results


def test_output_names_never_clash() -> None:
    namer = OutputNamer(".png")
    names = [namer(p) for p in ["a/x.jpg", "a/x.png", "a/x.png", "b/x.jpg", "noext", ".hidden"]]
    assert names == [
        PurePosixPath("a/x.png"),
        PurePosixPath("a/x.png.png"),
        PurePosixPath("a/x.png-1.png"),
        PurePosixPath("b/x.png"),
        PurePosixPath("noext.png"),
        PurePosixPath(".hidden.png"),
    ]
    assert len(set(names)) == len(names)


def test_table_round_trip(tmp_path: Path) -> None:
    header = result_columns(2, include_index=True)
    assert header == ["filename", "index_0", "index_1", "label_0", "label_1", "prob_0", "prob_1"]
    rows = {"b.png": result_record([1, 0], [0.61234567, 0.3], ["dog", "cat"], True, flat=True)}
    write_results(tmp_path / "r.csv", "csv", rows, header)
    again, read_header = read_results(tmp_path / "r.csv", "csv")
    assert read_header == header and again["b.png"]["prob_0"] == "0.612346"
    json_rows = {"b.png": result_record([1, 0], [0.6, 0.3], ["dog", "cat"], False, flat=False)}
    write_results(tmp_path / "r.json", "json", json_rows, result_columns(2))
    assert read_results(tmp_path / "r.json", "json") == (json_rows, result_columns(2))


def _module(class_names: list[str] | None) -> SimpleNamespace:
    return SimpleNamespace(hparams={"class_names": class_names})


def test_lightning_writer_uses_the_predict_schema(tmp_path: Path) -> None:
    writer = PredictionWriter(str(tmp_path), topk=2)
    trainer = SimpleNamespace(global_rank=0, world_size=1)
    module = _module(["cat", "dog", "bird"])
    writer.on_predict_start(trainer, module)
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    writer.write_on_batch_end(trainer, module, probs, [0, 1], {"id": ["s/a.jpg", "b.png"]}, 0)
    writer.on_predict_end(trainer, module)
    with open(tmp_path / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == result_columns(2)
    assert [r["filename"] for r in rows] == ["b.png", "s/a.jpg"]
    assert rows[1]["label_0"] == "dog" and rows[1]["prob_0"] == "0.7"


def test_lightning_writer_masks_do_not_clash(tmp_path: Path) -> None:
    writer = PredictionWriter(str(tmp_path))
    trainer = SimpleNamespace(global_rank=0, world_size=1)
    writer.on_predict_start(trainer, _module(None))
    probs = torch.zeros(2, 3, 4, 5)
    probs[0, 1], probs[1, 2] = 1.0, 1.0
    writer.write_on_batch_end(trainer, _module(None), probs, [0, 1], {"id": ["d/a.jpg", "d/a.png"]}, 0)
    assert np.asarray(Image.open(tmp_path / "masks" / "d" / "a.png")).tolist() == [[1] * 5] * 4
    assert np.asarray(Image.open(tmp_path / "masks" / "d" / "a.png.png")).tolist() == [[2] * 5] * 4
