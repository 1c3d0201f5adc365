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
    assert isinstance(got["rows"], dict) and list(got["rows"]) == ["sparks16"]
    row = got["rows"]["sparks16"]
    # accuracies in percent, aligned with the seeds: the table's cell and this one compare directly
    assert row["seeds"] == [1] and len(row["acc"]) == 1 and 1 < row["acc"][0] <= 100
    assert row["acc"][0] == pytest.approx(row["epoch_acc"][0][-1])
    assert len(row["epoch_acc"][0]) == 3 and row["bits_per_weight"] == pytest.approx(4 / 9)
    # The Sparks model was exported, compiled and run on every test image.
    check = got["compiled"]["sparks16/seed1"]
    assert check["default"]["n"] == 1000 and check["default"]["prediction_mismatches"] == 0
    assert all(lay["kind"] == "sparks" for lay in check["layers"])
    # Images with a pre-sign value within 1e-5 of 0 are counted; on the others only float32
    # rounding separates the compiled logits from PyTorch's.
    assert 0 <= check["images_near_threshold"] < 1000 and check["sign_margin"] == 1e-5
    assert check["default"]["max_abs_logit_diff_away_from_threshold"] < 1e-3
    assert check["default"]["mismatch_margins"] == [] and check["default"]["mismatches_near_threshold"] == 0
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

    # A table from several invocations: a cell does not depend on which other rows ran with it,
    # so one seed of two rows, run alone, merges with the table above by row and seed.
    one = tmp_path / "one.json"
    assert script.main(TINY + ["--rows", "sparks16", "dense", "--seeds", "2", "--no-compile", "--json", str(one)]) == 0
    merged_dir = tmp_path / "merged"
    assert script.main(["--merge", str(one), str(tmp_path / "mnist_table.json"), "--note", "merged",
                        "--out", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "mnist_table.json").read_text())
    assert list(merged["rows"]) == ["float", "dense", "snn16", "sparks16", "topk16"]  # the default row order
    for name, row in got["rows"].items():
        assert merged["rows"][name]["seeds"] == [0, 2]
        assert merged["rows"][name]["acc"] == row["acc"]
        assert merged["rows"][name]["acc_mean"] == pytest.approx(row["acc_mean"])
    assert len(merged["merged_from"]) == 2
    reordered = {name: got["rows"][name] for name in merged["rows"]}
    assert merged["goals"] == script.goals(reordered, got["compiled"])
    assert "**Note:** merged" in (merged_dir / "mnist_table.md").read_text()
    bad = json.loads(one.read_text())
    bad["rows"]["dense"]["acc"][0] += 1.0
    with pytest.raises(ValueError, match="dense seed 2"):
        script.merge_tables([got, bad])


def _row(kind, acc, spread=0.1, seeds=(0, 1, 2)):
    return {"kind": kind, "seeds": list(seeds), "acc": [acc] * len(seeds), "acc_mean": acc, "acc_std": 0.0,
            "last3_spread_max": spread}


def test_goals_say_by_how_much_a_goal_is_missed(script):
    rows = {"float": _row("float", 98.9), "dense": _row("dense", 97.0), "snn16": _row("snn", 96.0),
            "sparks16": _row("sparks", 96.7, spread=0.5), "sparks32": _row("sparks", 96.8),
            "sparks64": _row("sparks", 96.75)}
    compiled = {f"sparks{k}/seed{s}": {"default": {"n": 10, "prediction_mismatches": 0, "layer_problems": []}}
                for k in (16, 32, 64) for s in (0, 1, 2)}
    g = script.goals(rows, compiled)
    text = "\n".join(g)
    assert "float >= 99.0 %: 98.90 % (not met by 0.10 points)" in g
    assert "sparks16 - snn16 = +0.70 points (goal >= +0.5, stretch +1.0: met, stretch missed by 0.30 points)" in g
    assert "dense - sparks16 = +0.30 points (goal <= 1.0, stretch 0.5: met, stretch met)" in g
    assert "sparks16 <= sparks32 <= sparks64 <= dense (96.70, 96.80, 96.75, 97.00): not met by 0.05 points" in g
    assert "not met by 0.20 points; over 0.3: sparks16 0.50" in text
    assert g[-1].startswith("compiled = trained: 9 of 9 Sparks models") and g[-1].endswith(": met")
    del compiled["sparks64/seed2"]
    compiled["sparks16/seed0"]["default"]["prediction_mismatches"] = 1
    assert script.goals(rows, compiled)[-1].endswith("not met (sparks64/seed2, sparks16/seed0)")


def test_cache_reuses_the_teacher_and_stage_one_only_when_they_would_be_the_same(script, tmp_path, capsys):
    cache = tmp_path / "cache"
    cell = TINY + ["--rows", "dense", "--seeds", "0", "--no-compile", "--cache", str(cache)]
    assert script.main(cell + ["--json", str(tmp_path / "a.json")]) == 0
    first = capsys.readouterr().out
    assert "loaded from" not in first and len(list(cache.iterdir())) == 2  # teacher, stage 1
    assert script.main(cell + ["--json", str(tmp_path / "b.json")]) == 0
    again = capsys.readouterr().out
    assert again.count("loaded from") == 2 and "float teacher, seed" not in again
    a, b = (json.loads((tmp_path / f).read_text())["rows"]["dense"] for f in ("a.json", "b.json"))
    assert a["epoch_acc"] == b["epoch_acc"] and a["stage1_acc"] == b["stage1_acc"]
    # Another stage-1 recipe is another net: trained, not loaded.
    assert script.main(cell + ["--epochs-stage1", "2"]) == 0  # the last occurrence of a flag wins
    other = capsys.readouterr().out
    assert other.count("loaded from") == 1 and "stage 1 (dense BNN)" in other
    assert len(list(cache.iterdir())) == 3
