"""ARM tuning on the emulated Pi (``runner="emulated-pi"``): NEON plans by instruction counts.

One small Sparks layer (32->32 at 12x12, K=16) is tuned with a handful of trials; the tests
check what the records hold, that ``compile(..., tuning_db=...)`` builds what they say (plan
and Sparks-vs-dense choice), that the tuned whole layer executes no more instructions than
the default one on the emulated Pi and computes the same outputs, and the errors. The
emulated Pi comes from ``scripts/emulated_pi/setup.sh`` (cached); without it the counting
tests skip, except on CI, which must run them.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import sparks_tvm
from schedules import tuning, tuning_neon
from sparks_tvm import cli
from sparks_tvm.cost import RESNET18_BINARY_LAYERS
from sparks_tvm.errors import TuningError
from sparks_tvm.kernels import ConvGeometry
from sparks_tvm.kernels import binary_conv2d_neon, sparks_conv2d_neon
from sparks_tvm.target import resolve_target
from sparks_tvm.tune import emulated_pi
from sparks_tvm.tune.arm_records import ARM_TRIALS_FILE, PLANS_FILE, read_plans
from sparks_tvm.tune.database import tuned_schedules

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts" / "emulated_pi"))
from arm_layers import Model, count_models, layer_onnx  # noqa: E402

CIN, COUT, SIDE = 32, 32, 12
GEOM = ConvGeometry(1, CIN, SIDE, SIDE, COUT)


@pytest.fixture(scope="module")
def device():
    pi = emulated_pi.pi_module()
    try:
        pi.setup()
    except pi.ProvisionError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the emulated-Pi tests, but provisioning is impossible: {err}")
        pytest.skip(f"cannot provision the emulated Pi here: {err}")
    return pi


@pytest.fixture(scope="module")
def arm():
    return resolve_target("arm_cpu")


@pytest.fixture(scope="module")
def layer():
    data = layer_onnx(CIN, COUT, SIDE, 1, "sparks", 16, seed=3)
    x = np.random.default_rng(0).standard_normal((1, CIN, SIDE, SIDE)).astype(np.float32)
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return data, x, want


@pytest.fixture(scope="module")
def tuned(device, layer, tmp_path_factory):
    """Both kernels (Sparks and dense) searched, 5 trials."""
    work = tmp_path_factory.mktemp("tune_arm")
    res = sparks_tvm.tune(layer[0], "arm_cpu", work, trials=5, runner="emulated-pi", batch=5, progress=False)
    return work, res


@pytest.fixture(scope="module")
def tuned_sparks(device, layer, tmp_path_factory):
    """The Sparks kernel only (force_kind), 6 trials: a plan search without the dense alternative."""
    work = tmp_path_factory.mktemp("tune_arm_sparks")
    res = sparks_tvm.tune(layer[0], "arm_cpu", work, trials=6, runner="emulated-pi", force_kind="sparks",
                          batch=6, progress=False)
    return work, res


# ---------------------------------------------------------------- design spaces (no emulator)


@pytest.mark.parametrize("cin,cout,side,stride", RESNET18_BINARY_LAYERS)
def test_default_plans_are_the_first_points(cin, cout, side, stride):
    geom = ConvGeometry(1, cin, side, side, cout, stride=(stride, stride))
    kn = tuning_neon.neon_sparks_knobs(geom, 16, 4)
    assert tuning_neon.neon_sparks_plan(geom, 16, 4, **{n: v[0] for n, v in kn.items()}) == \
        sparks_conv2d_neon.default_plan(geom, 16, 4)
    dk = tuning_neon.neon_dense_knobs(geom, 4)
    assert tuning_neon.neon_dense_plan(geom, 4, **{n: v[0] for n, v in dk.items()}) == binary_conv2d_neon.default_plan(geom, 4)
    # Wide enough to matter: tiles, chunks, channel blocks; pixels per tile, weight registers.
    assert len(kn["tile"]) >= 4 and len(kn["chunk"]) >= 3 and len(kn["block"]) >= 4
    assert len(dk["pixels"]) >= 5 and len(dk["o_regs"]) >= 4
    assert tuning_neon.neon_sparks_plan(geom, 16, 4, tile=64, chunk=48, block=16) is None  # chunk must divide the tile


# ---------------------------------------------------------------- errors (no emulator)


def test_unknown_runner_name_is_an_error(layer):
    with pytest.raises(TuningError, match="unknown runner 'emulated_pi'.*emulated-pi"):
        sparks_tvm.tune(layer[0], "arm_cpu", "unused", trials=1, runner="emulated_pi")
    with pytest.raises(TuningError, match="rpc_runner"):
        sparks_tvm.tune(layer[0], "arm_cpu", "unused", trials=1, runner="rpc")


def test_emulated_pi_needs_an_arm_target(layer, tmp_path):
    with pytest.raises(TuningError, match="aarch64 instructions: tune an ARM target"):
        sparks_tvm.tune(layer[0], "llvm", tmp_path, trials=1, runner="emulated-pi")


def test_emulated_pi_not_set_up_says_what_to_run(layer, tmp_path, monkeypatch):
    class FakePi:
        class PiError(RuntimeError):
            pass

        def setup(self, timeout=600):
            raise self.PiError("qemu-aarch64 is not installed")

    monkeypatch.setattr(emulated_pi, "pi_module", lambda: FakePi())
    with pytest.raises(TuningError, match="not set up.*scripts/emulated_pi/setup.sh"):
        sparks_tvm.tune(layer[0], "arm_cpu", tmp_path, trials=1, runner="emulated-pi")
    assert not (tmp_path / PLANS_FILE).exists()


def test_cli_runner_flag(layer, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(layer[0])
    assert cli.main(["tune", str(model), "--target", "arm_cpu", "--runner", "bogus", "--work-dir", str(tmp_path)]) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    assert cli.main(["tune", str(model), "--target", "arm_cpu", "--runner", "rpc", "--work-dir", str(tmp_path)]) == 2
    assert "--rpc-tracker" in capsys.readouterr().err


def test_search_keeps_the_default_and_never_chooses_an_inexact_plan(arm, tmp_path):
    """The search with a stand-in counter (no emulator): defaults counted first, in one launch;
    the cheapest exact plan wins; a cheaper plan whose output was wrong is recorded, never chosen."""
    from sparks_tvm.tune import ArmTask, tune_arm_tasks
    from sparks_tvm.tune.emulated_pi import Counted

    launches = []

    def counter(kernels, target):
        launches.append([k.label for k in kernels])
        out = {}
        for k in kernels:
            if "tile=16," in k.label:
                out[k.tag] = Counted(10, False, 3)  # the cheapest, but wrong
            elif "sparks" in k.label.split()[1] and "block=8," in k.label:
                out[k.tag] = Counted(500, True)
            else:
                out[k.tag] = Counted(1000, True)
        return out

    geom = ConvGeometry(1, 16, 6, 6, 16)
    task = ArmTask(geom, 16, "sign", 2)
    res = tune_arm_tasks([task], arm, tmp_path, trials=200, batch=50, counter=counter, progress=False)
    defaults = [str(sparks_conv2d_neon.default_plan(geom, 16, 4)), str(binary_conv2d_neon.default_plan(geom, 4))]
    assert [lab.split(" ", 2)[2] for lab in launches[0]] == defaults
    rec = read_plans(tmp_path)["tasks"][task.name]
    assert rec["default"]["sparks"]["count"] == 1000 and rec["best"]["sparks"]["count"] == 500
    assert rec["best"]["sparks"]["plan"]["block"] == 8 and rec["best"]["sparks"]["plan"]["tile"] != 16
    assert rec["best"]["dense"]["plan"] == rec["default"]["dense"]["plan"]  # ties keep the default
    assert rec["choice"] == "sparks" and res.tasks[0].best_count == 500 and res.tasks[0].layers == 2
    rows = _trials(tmp_path)
    assert any(r["exact"] is False and r["plan"]["tile"] == 16 for r in rows)
    assert res.trials_run == len(rows) - 2 < 200  # the spaces ran out before the trials did


# ---------------------------------------------------------------- on the emulated Pi


def _trials(work):
    with open(os.path.join(work, ARM_TRIALS_FILE)) as fh:
        return [json.loads(line) for line in fh]


def test_records_hold_defaults_trials_and_the_choice(tuned):
    work, res = tuned
    data = read_plans(work)
    assert '"aarch64-linux-gnu"' in data["target"] and data["runner"] == "emulated-pi"
    (name, rec), = data["tasks"].items()
    assert rec["geom"] == "1x32x12x12_o32_k3x3_s1x1_p1111" and rec["k"] == 16 and rec["layers"] == 1
    rows = _trials(work)
    assert sum(r["default"] for r in rows) == 2 and sum(not r["default"] for r in rows) == 5 == res.trials_run
    assert all(r["exact"] for r in rows), "every candidate is checked against the reference"
    for fam in ("sparks", "dense"):
        counted = [r["count"] for r in rows if r["family"] == fam]
        assert rec["best"][fam]["count"] == min(counted)
        assert rec["best"][fam]["count"] <= rec["default"][fam]["count"]
    assert rec["choice"] == min(("sparks", "dense"), key=lambda f: rec["best"][f]["count"])
    (task,) = res.tasks
    assert task.best_count <= task.default_count and task.chosen_kernel == rec["choice"]
    assert "instructions" in res.table() and "not time" in res.table()


def test_compile_applies_the_records(tuned, arm, layer):
    work, _ = tuned
    rec = next(iter(read_plans(work)["tasks"].values()))
    sched = tuned_schedules(work, arm)
    assert sched.plans is not None
    assert sched.sparks_is_cheaper(GEOM, 16) == (rec["choice"] == "sparks")
    assert sched.neon_plan(GEOM, 16) == sparks_conv2d_neon.NeonSparksPlan(**rec["best"]["sparks"]["plan"])
    sched.schedule_binary_conv2d(GEOM, "sign")
    assert ("dense_plan", next(iter(read_plans(work)["tasks"]))) in sched.plans.applied
    model = sparks_tvm.compile(layer[0], "arm_cpu", tuning_db=work)
    assert [r.kind for r in model.report] == ["sparks" if rec["choice"] == "sparks" else "binary"]


def test_tuned_layer_is_no_more_instructions_and_same_outputs(tuned, tuned_sparks, layer, tmp_path):
    data, x, want = layer
    default = sparks_tvm.compile(data, "arm_cpu")
    both = sparks_tvm.compile(data, "arm_cpu", tuning_db=tuned[0])
    plan_only = sparks_tvm.compile(data, "arm_cpu", tuning_db=tuned_sparks[0])
    counts = count_models([Model(0, "default", default, [x], want, atol=1e-4),
                           Model(1, "tuned", both, [x], want, atol=1e-4),
                           Model(2, "tuned plan", plan_only, [x], want, atol=1e-4)], workdir=tmp_path)
    assert counts[1][0] <= counts[0][0] and counts[2][0] <= counts[0][0]
    outs = [np.load(tmp_path / f"out_{tag}.npy") for tag in range(3)]
    np.testing.assert_array_equal(outs[1], outs[0])  # binary convs are exact: same int32, same epilogue
    np.testing.assert_array_equal(outs[2], outs[0])
    # The Sparks-only run: compile must build the recorded plan, so a plan that counted fewer
    # instructions than the default must make the whole compiled layer cheaper too.
    rec = next(iter(read_plans(tuned_sparks[0])["tasks"].values()))
    assert rec["choice"] == "sparks" and "dense" not in rec["best"]
    if rec["best"]["sparks"]["plan"] != rec["default"]["sparks"]["plan"]:
        assert counts[2][0] < counts[0][0]
        saved = rec["default"]["sparks"]["count"] - rec["best"]["sparks"]["count"]
        assert abs((counts[0][0] - counts[2][0]) - saved) <= 0.05 * saved + 2000
    else:
        assert counts[2][0] == counts[0][0]


def test_rerun_resumes(tuned, layer):
    work, _ = tuned
    before = len(_trials(work))
    again = sparks_tvm.tune(layer[0], "arm_cpu", work, trials=5, runner="emulated-pi", progress=False)
    assert again.trials_run == 0 and len(_trials(work)) == before  # nothing recounted


def test_arm_records_refuse_another_target(tuned):
    with pytest.raises(TuningError, match="were made for target"):
        tuned_schedules(tuned[0], resolve_target("llvm"))
