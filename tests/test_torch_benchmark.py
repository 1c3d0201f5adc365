"""benchmarks/train_mnist.py end to end on a small slice: the JSON layout the table and the
one-cell reproduction share, the compiled = trained check, determinism."""

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_mnist", os.path.join(ROOT, "benchmarks", "train_mnist.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


TINY = ["--data", "mnist5k", "--train-subset", "384", "--epochs-float", "1", "--epochs-stage1", "1",
        "--epochs", "3", "--widths", "8", "16", "--blocks", "1", "1", "--recalibrate-images", "256",
        "--compile-batch", "250"]


def test_one_cell_writes_the_table_layout_and_is_deterministic(script, tmp_path):
    out = tmp_path / "cell.json"
    assert script.main(TINY + ["--rows", "sparks16", "--seeds", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["data"]["train"] == 384 and got["data"]["test"] == 1000
    assert list(got["rows"]) == ["sparks16"]
    row = got["rows"]["sparks16"]
    assert row["seeds"] == [1] and len(row["acc"]) == 1 and 0 <= row["acc"][0] <= 100
    assert len(row["epoch_acc"][0]) == 3 and row["bits_per_weight"] == pytest.approx(4 / 9)
    # The Sparks model was exported, compiled and run on every test image.
    check = got["compiled"]["sparks16/seed1"]
    assert check["default"]["n"] == 1000 and check["default"]["prediction_mismatches"] == 0
    assert all(lay["kind"] == "sparks" for lay in check["layers"])
    assert len(check["layers"]) == 2 and all(len(lay["selected"]) == 16 for lay in check["layers"])
    # Deterministic on the CPU: the same command gives the same accuracies.
    again = tmp_path / "again.json"
    assert script.main(TINY + ["--rows", "sparks16", "--seeds", "1", "--no-compile", "--json", str(again)]) == 0
    assert json.loads(again.read_text())["rows"]["sparks16"]["epoch_acc"] == row["epoch_acc"]


def test_table_rows_share_a_seed_stage_one_and_report_goals(script, tmp_path):
    assert script.main(TINY + ["--rows", "float", "dense", "snn16", "topk16", "sparks16", "--seeds", "0", "2",
                               "--no-compile", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "mnist_table.json").read_text())
    assert list(got["rows"]) == ["float", "dense", "snn16", "topk16", "sparks16"]
    for row in got["rows"].values():
        assert row["seeds"] == [0, 2] and len(row["acc"]) == 2
    # Counting and Sparks start from the same stage-1 kernels; random codewords do not.
    top, sp, snn = (got["rows"][r]["codes"] for r in ("topk16", "sparks16", "snn16"))
    assert top[0][0] != snn[0][0]
    assert len(set(top[0][0]) & set(sp[0][0])) >= 8
    assert any(g.startswith("sparks16 - snn16") for g in got["goals"])
    assert (tmp_path / "mnist_table.png").stat().st_size > 1000
    assert "| sparks16 | 16 |" in (tmp_path / "mnist_table.md").read_text()
