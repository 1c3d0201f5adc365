"""sparks_tvm.torch on real data: MNIST-5k split, a short seeded training run, export and
"compiled = trained" (the compiled model predicts what PyTorch predicts)."""

import numpy as np
import pytest
import torch

import sparks_tvm
from sparks_tvm.errors import SparksError
from sparks_tvm.torch import (
    BiRealNet,
    TemperatureSchedule,
    TrainConfig,
    check_compiled,
    export_onnx,
    predict,
    sign_margins,
    train,
)
from sparks_tvm.torch.data import load_mnist5k, mnist5k_split, stratified_split


@pytest.fixture(scope="module")
def split():
    return mnist5k_split(test_fraction=0.2, seed=0)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # small nets: threads cost more than they give on 2 shared cores
    yield
    torch.set_num_threads(old)


def test_mnist5k_loads_and_splits_stratified(split):
    images, labels = load_mnist5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    assert np.array_equal(np.bincount(labels), [500] * 10)
    assert split.x_train.shape == (4000, 1, 28, 28) and split.x_test.shape == (1000, 1, 28, 28)
    assert np.array_equal(np.bincount(split.y_test), [100] * 10)
    assert abs(float(split.x_train.mean())) < 1e-4 and abs(float(split.x_train.std()) - 1) < 1e-3
    # Held out: no test image is a training image; the split is a pure function of the seed.
    train_rows = {row.tobytes() for row in split.x_train.reshape(4000, -1)}
    assert sum(row.tobytes() in train_rows for row in split.x_test.reshape(1000, -1)) <= 2  # MNIST has few duplicates
    again = mnist5k_split(seed=0)
    assert np.array_equal(again.y_test, split.y_test) and np.array_equal(again.x_test, split.x_test)
    other = stratified_split(images, labels, seed=1)
    assert not np.array_equal(other.x_test, split.x_test)
    with pytest.raises(SparksError, match="test_fraction"):
        stratified_split(images, labels, test_fraction=1.5)


def tiny_net(kind, k=16, seed=0):
    # Odd widths (not multiples of 32), a stride-2 block and a float 1x1 shortcut.
    return BiRealNet(kind, widths=(19, 37), blocks=(1, 2), codewords=k, seed=seed)


def short_run(net, split, n=768, epochs=2, seed=0):
    cfg = TrainConfig(epochs=epochs, batch_size=64, seed=seed, schedule=TemperatureSchedule(noise0=0.3))
    return train(net, split.x_train[:n], split.y_train[:n], cfg)


def test_tiny_training_run_reduces_the_loss(split):
    net = tiny_net("sparks")
    x, y = torch.from_numpy(split.x_train[:768]), torch.from_numpy(split.y_train[:768])
    net.eval()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(net(x), y).item()
    res = short_run(net, split, epochs=3)
    net.eval()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(net(x), y).item()
    assert res.losses[-1] < res.losses[0] < before
    assert after < 0.6 * before, (before, after, res.losses)
    # Same seed, same run: fixed seeds make the table reproducible.
    again = tiny_net("sparks")
    assert short_run(again, split, epochs=3).losses == res.losses


def compile_and_compare(net, split, batch=50, n=200, force_kind=None):
    x = split.x_test[:n]
    exported = export_onnx(net, x[:batch])
    compiled = sparks_tvm.compile(exported.onnx, force_kind=force_kind)
    torch_logits, torch_pred = predict(net, x)
    got = np.concatenate([compiled.run(x[i:i + batch])[0] for i in range(0, n, batch)])
    return exported, compiled, torch_logits, torch_pred, got


def test_trained_sparks_model_compiles_to_sparks_and_predicts_like_torch(split, tmp_path):
    net = tiny_net("sparks", k=16)
    short_run(net, split)
    exported, compiled, ref_logits, ref_pred, got = compile_and_compare(net, split)
    assert check_compiled(compiled.report, exported.layers) == []
    assert [r.kind for r in compiled.report].count("sparks") == 3
    for lay in exported.layers:
        assert lay.kind == "sparks" and lay.codewords == 16 and len(set(lay.selected)) == 16
        assert lay.used <= 16 and lay.bits_per_weight == pytest.approx(4 / 9)
        assert lay.weight_bits == lay.in_channels * lay.out_channels * 4 + 16 * 9
    assert np.array_equal(got.argmax(1), ref_pred)
    np.testing.assert_allclose(got, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
    # The written file and its layer summary.
    path = tmp_path / "m.onnx"
    out = export_onnx(net, split.x_test[:2], path)
    assert path.read_bytes() == out.onnx and (tmp_path / "m.onnx.layers.json").exists()
    assert "sparks" in str(out)


@pytest.mark.parametrize("kind,k", [("dense", None), ("snn", 32)])
def test_baselines_export_and_compile(split, kind, k):
    net = tiny_net(kind, k=k or 16, seed=1)
    short_run(net, split, n=256, epochs=1)
    force = "sparks" if kind == "snn" else None  # K=32 at width 19-37: the cost model may prefer dense
    exported, compiled, ref_logits, ref_pred, got = compile_and_compare(net, split, batch=40, n=80, force_kind=force)
    assert check_compiled(compiled.report, exported.layers) == []
    assert all(r.kind in ("sparks", "binary") for r in compiled.report if r.binarizer)
    assert np.array_equal(got.argmax(1), ref_pred)
    np.testing.assert_allclose(got, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())


def test_check_compiled_reports_mismatches(split):
    net = tiny_net("sparks", k=16)
    exported = export_onnx(net, split.x_test[:1])
    compiled = sparks_tvm.compile(exported.onnx, force_kind="binary")
    problems = check_compiled(compiled.report, exported.layers)
    assert len(problems) == 3 and all("not 'sparks'" in p for p in problems)


def test_export_rejects_bad_example_input():
    with pytest.raises(SparksError, match=r"\(N, C, H, W\)"):
        export_onnx(tiny_net("sparks"), np.zeros((28, 28), np.float32))


def test_selection_frozen_after_selection_end(split):
    # selection_end=0: the selection logits never move, the rest of the net does.
    net = tiny_net("sparks", k=16)
    before = [p.detach().clone() for p in net.parameters()]
    logits = [m.selector.logits.detach().clone() for m in net.modules() if hasattr(m, "selector")]
    cfg = TrainConfig(epochs=1, batch_size=64, selection_end=0.0, schedule=TemperatureSchedule(noise0=0.3))
    train(net, split.x_train[:192], split.y_train[:192], cfg)
    after = [m.selector.logits.detach() for m in net.modules() if hasattr(m, "selector")]
    assert all(torch.equal(a, b) for a, b in zip(logits, after))
    assert not all(torch.equal(a, b.detach()) for a, b in zip(before, net.parameters()))


def test_top_k_codes_counts_dense_kernels():
    from sparks_tvm.torch import DenseBinaryConv2d, top_k_codes
    from sparks_tvm.torch.codebook import all_codewords

    book = all_codewords()
    layer = DenseBinaryConv2d(4, 6, 3)
    # 24 kernels: code 5 seven times, code 300 five times, code 9 four times, eight others once.
    codes = [5] * 7 + [300] * 5 + [9] * 4 + [100, 101, 102, 103, 104, 105, 106, 107]
    with torch.no_grad():
        w = book[torch.tensor(codes)] * torch.linspace(0.1, 1.0, 24).unsqueeze(1)
        layer.weight.copy_(w.view(6, 4, 3, 3))
    assert top_k_codes(layer.weight, 3).tolist() == [5, 300, 9]
    # Among the kernels seen once the heaviest (the last, 107) comes first; then unseen codes by index.
    top = top_k_codes(layer.weight, 16).tolist()
    assert top == [5, 300, 9, 107, 106, 105, 104, 103, 102, 101, 100, 0, 1, 2, 3, 4]


def test_two_stage_init_starts_from_the_dense_net(split):
    from sparks_tvm.torch import init_from_dense, top_k_codes
    from sparks_tvm.torch.layers import binary_convs

    dense = tiny_net("dense", seed=3)
    short_run(dense, split, n=256, epochs=1)
    sparks, topk, snn = tiny_net("sparks", k=16, seed=4), tiny_net("topk", k=16, seed=4), tiny_net("snn", k=16, seed=4)
    snn_codes = [m.selected_codes() for _, m in binary_convs(snn)]
    for net in (sparks, topk, snn):
        init_from_dense(net, dense)
    for (name, d), (_, s), (_, t), (_, r), before in zip(binary_convs(dense), binary_convs(sparks),
                                                         binary_convs(topk), binary_convs(snn), snn_codes):
        want = top_k_codes(d.weight, 16)
        assert np.array_equal(s.selected_codes(), want), name
        assert np.array_equal(t.selected_codes(), want), name
        assert np.array_equal(r.selected_codes(), before)  # random codebooks are not replaced
        assert torch.equal(s.weight, d.weight) and torch.equal(r.weight, d.weight)
    assert torch.equal(sparks.fc.weight, dense.fc.weight)
    assert torch.equal(sparks.blocks[0].bn.running_var, dense.blocks[0].bn.running_var)
    # Learning can still move the selection away from the counted one; counting cannot.
    cfg = TrainConfig(epochs=1, batch_size=64, selection_lr=0.5, schedule=TemperatureSchedule(noise0=0.0))
    start = [m.selected_codes() for _, m in binary_convs(sparks)]
    train(sparks, split.x_train[:256], split.y_train[:256], cfg)
    assert any(not np.array_equal(a, m.selected_codes()) for a, (_, m) in zip(start, binary_convs(sparks)))
    with pytest.raises(SparksError, match="no dense binary conv"):
        init_from_dense(tiny_net("sparks"), tiny_net("float"))


def test_distillation_needs_a_teacher_and_pulls_towards_it(split):
    x, y = split.x_train[:256], split.y_train[:256]
    with pytest.raises(SparksError, match="needs a teacher"):
        train(tiny_net("dense"), x, y, TrainConfig(epochs=1, kd_weight=1.0))
    with pytest.raises(SparksError, match="kd_weight"):
        TrainConfig(kd_weight=1.5)
    teacher = tiny_net("float", seed=7)  # untrained: its soft labels are far from the true ones
    xt = torch.from_numpy(x)
    with torch.no_grad():
        target = torch.softmax(teacher.eval()(xt), 1)

    def kl_to_teacher(net):
        with torch.no_grad():
            return torch.nn.functional.kl_div(torch.log_softmax(net.eval()(xt), 1), target,
                                              reduction="batchmean").item()

    plain, kd = tiny_net("dense"), tiny_net("dense")
    train(plain, x, y, TrainConfig(epochs=2, batch_size=64))
    train(kd, x, y, TrainConfig(epochs=2, batch_size=64, kd_weight=1.0), teacher=teacher)
    assert kl_to_teacher(kd) < 0.5 * kl_to_teacher(plain)


def test_per_epoch_accuracy_and_selection_changes_are_recorded(split):
    net = tiny_net("sparks", k=16)
    cfg = TrainConfig(epochs=2, batch_size=64, selection_end=0.5, recalibrate_images=128,
                      schedule=TemperatureSchedule(noise0=1.0, noise_end=0.25))
    res = train(net, split.x_train[:256], split.y_train[:256], cfg, split.x_test[:100], split.y_test[:100])
    assert len(res.test_accuracy) == 3 and res.final_accuracy == res.test_accuracy[-1]
    # Gumbel noise in the first epoch changes codewords every step; in the second epoch the
    # noise is 0 and the selection frozen, so the training forward uses one fixed codebook.
    assert res.selection_changes[0] > 1 and res.selection_changes[1] == 0
    assert all(m.selector.logits.requires_grad for m in net.modules() if hasattr(m, "selector"))


def test_recalibration_uses_the_inference_function_of_upstream_layers(split):
    from sparks_tvm.torch import recalibrate_batchnorm

    net = tiny_net("dense", seed=5)
    short_run(net, split, n=256, epochs=1)
    x = split.x_train[:300]
    recalibrate_batchnorm(net, x, batch_size=100)
    # Each BatchNorm's statistics are those of its input when everything before it runs in
    # eval mode: exactly what the exported model computes.
    seen = {}
    bn = net.blocks[1].bn
    hook = bn.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        net.eval()(torch.from_numpy(x))
    hook.remove()
    torch.testing.assert_close(bn.running_mean, seen["x"].mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert all(not m.training for m in net.modules())


def test_frozen_batchnorm_keeps_the_statistics_it_was_frozen_with(split):
    import copy

    from sparks_tvm.torch import recalibrate_batchnorm

    net = tiny_net("dense", seed=6)
    start = copy.deepcopy(net)
    cfg = TrainConfig(epochs=1, batch_size=64, bn_freeze=0.0, recalibrate_images=128)
    train(net, split.x_train[:256], split.y_train[:256], cfg, split.x_test[:50], split.y_test[:50])
    recalibrate_batchnorm(start.to(memory_format=torch.channels_last), split.x_train[:128])
    for a, b in zip(net.modules(), start.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            torch.testing.assert_close(a.running_var, b.running_var)
    assert not torch.equal(net.fc.weight, start.fc.weight)


def test_parameter_average_is_evaluated_and_kept_without_changing_the_trajectory(split):
    with pytest.raises(SparksError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    x, y = split.x_train[:256], split.y_train[:256]
    runs = {}
    for decay in (0.0, 0.9):
        net = tiny_net("sparks", seed=4)
        cfg = TrainConfig(epochs=2, batch_size=64, seed=1, ema_decay=decay, recalibrate_images=128,
                          eval_live=decay > 0)
        runs[decay] = (net, train(net, x, y, cfg, split.x_test[::10], split.y_test[::10]))
    (plain, res0), (avg, res1) = runs[0.0], runs[0.9]
    # The average is swapped in only to evaluate: the training steps, hence the losses, are the
    # live parameters' and identical with and without it.
    assert res1.losses == res0.losses
    # eval_live also scores the live parameters each epoch: the run without the average.
    assert res0.live_accuracy == [] and res1.live_accuracy == res0.test_accuracy[:2]
    # ...and it is what the run returns: not the live (last-step) parameters.
    assert not torch.equal(avg.blocks[0].conv.weight, plain.blocks[0].conv.weight)


def test_parameter_average_arithmetic():
    from sparks_tvm.torch.train import _ParameterAverage

    p = torch.nn.Parameter(torch.zeros(3))
    ema = _ParameterAverage([p], 0.5)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update()  # 0.5 * 0 + 0.5 * 4
    with torch.no_grad():
        p.fill_(8.0)
    ema.update()  # 0.5 * 2 + 0.5 * 8
    ema.swap()
    assert torch.equal(p.detach(), torch.full((3,), 5.0))
    ema.swap()
    assert torch.equal(p.detach(), torch.full((3,), 8.0))


def _presign_min_by_hand(net, x):
    """min |input of each block's Sign| per image, by running the blocks one at a time."""
    net.eval()
    with torch.no_grad():
        h = net.stem(torch.from_numpy(x))
        best = torch.full((len(x),), float("inf"), dtype=torch.float64)
        for blk in net.blocks:
            pre = blk.move0(h)
            best = torch.minimum(best, pre.abs().flatten(1).amin(1).double())
            h = blk(h)
    return best.numpy()


def test_sign_margins_find_images_whose_compiled_signs_may_differ(split):
    net = tiny_net("sparks", k=16, seed=2)
    short_run(net, split, n=512, epochs=1)
    x = split.x_test[:100]
    margins = sign_margins(net, x)
    np.testing.assert_array_equal(margins, _presign_min_by_hand(net, x))
    # Each image has thousands of pre-sign values; the closest to 0 is typically ~1e-4 away.
    assert (margins > 1e-5).mean() > 0.8 and margins[7] > 1e-5
    # Put one pre-sign value of image 7 (block 1, channel 3, one pixel) within 1e-7 of 0:
    # float32 rounding in the compiled float parts may now give it either sign.
    blk = net.blocks[1]
    with torch.no_grad():
        h = net.blocks[0](net.stem(torch.from_numpy(x[7:8])))
        v = (h + blk.move0.bias)[0, 3, 4, 5]
        blk.move0.bias[0, 3] -= v - 1e-7
    moved = sign_margins(net, x)
    assert moved[7] < 1e-6 and (moved[7] < margins[7])
    _, compiled, ref, _, got = compile_and_compare(net, split, batch=50, n=100)
    away = moved >= 1e-5
    assert away.sum() >= 80 and not away[7]
    # Everywhere else the compiled model is PyTorch's function up to float32 rounding:
    # a real export difference (BatchNorm folding, shifts, PReLU, Sign(0)) shows up here.
    np.testing.assert_allclose(got[away], ref[away], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cosine_learning_rate_schedule():
    lin, cos = TrainConfig(), TrainConfig(lr_schedule="cosine")
    assert [lin.lr_factor(p) for p in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]
    assert cos.lr_factor(0.0) == 1.0 and cos.lr_factor(1.0) == pytest.approx(0.0, abs=1e-12)
    assert cos.lr_factor(0.5) == pytest.approx(0.5) and cos.lr_factor(0.75) == pytest.approx(0.1464466)
    with pytest.raises(SparksError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    # A held tail: decay from 1 to the tail factor over the first half, then constant.
    tail = TrainConfig(lr_tail=0.5, lr_tail_factor=0.1)
    assert tail.lr_factor(0.0) == 1.0 and tail.lr_factor(0.25) == pytest.approx(0.55)
    assert [tail.lr_factor(p) for p in (0.5, 0.7, 1.0)] == [0.1, 0.1, 0.1]
    with pytest.raises(SparksError, match="lr_tail"):
        TrainConfig(lr_tail=1.0)


def _freeze_run(freeze, split):
    """A tiny Sparks run with a parameter average; what the training forwards used, step by step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from sparks_tvm.torch.layers import binary_convs

    net = tiny_net("sparks", seed=5)
    convs = [m for _, m in binary_convs(net)]
    seen = {"w": [], "codes": [], "fc": []}

    def record(m, inp, out):
        if m.training:
            seen["w"].append(m.weight.detach().clone())
            seen["codes"].append(m.last_codes.copy())

    seen["stepped"] = []  # the live latent weights after each optimizer step
    hooks = [convs[0].register_forward_hook(record),
             net.fc.register_forward_pre_hook(lambda m, inp: seen["fc"].append(m.weight.detach().clone())
                                              if m.training else None),
             register_optimizer_step_post_hook(
                 lambda opt, args, kwargs: seen["stepped"].append(convs[0].weight.detach().clone()))]
    # Default schedule: Gumbel noise until 70 % and a learned selection (selection_end 1.0),
    # so without the freeze both the latent weights and the training codewords move to the end.
    cfg = TrainConfig(epochs=2, batch_size=64, seed=2, ema_decay=0.9, binary_freeze=freeze, recalibrate_images=128)
    train(net, split.x_train[:256], split.y_train[:256], cfg)  # 4 steps per epoch, 8 in all
    for h in hooks:
        h.remove()
    return net, convs, seen


def test_binary_freeze_fixes_binary_weights_and_selection_and_trains_the_float_parameters(split):
    for bad in (-0.1, 1.5):
        with pytest.raises(SparksError, match="binary_freeze"):
            TrainConfig(binary_freeze=bad)
    net, convs, seen = _freeze_run(0.5, split)  # frozen from step 4 on
    assert len(seen["w"]) == 8
    # Before the freeze the latent weights moved; from it on every training forward used the
    # same latent weights and the same (noise-free) codewords, and they are the returned net's:
    # the binary part is not averaged on after the freeze.
    assert not torch.equal(seen["w"][0], seen["w"][3])
    assert all(torch.equal(w, seen["w"][4]) for w in seen["w"][4:])
    assert torch.equal(convs[0].weight.detach(), seen["w"][4])
    # With the average on, the frozen latent weights are the averaged ones at the freeze (the
    # net evaluated then), not the live ones of the last step.
    avg = seen["w"][0].clone()
    for w in seen["stepped"][:4]:
        avg.mul_(0.9).add_(w, alpha=0.1)
    torch.testing.assert_close(seen["w"][4], avg)
    assert not torch.equal(seen["w"][4], seen["stepped"][3])
    final_codes = convs[0].selected_codes()
    assert all(np.array_equal(c, final_codes) for c in seen["codes"][4:])
    for m in convs:  # the optimizer's freeze is undone on return
        assert m.weight.requires_grad and m.selector.logits.requires_grad
    # ...while the float parameters kept training (live and averaged both moved).
    assert not torch.equal(seen["fc"][4], seen["fc"][7])
    assert not torch.equal(net.fc.weight.detach(), seen["fc"][4])
    # Control: without the freeze the same run keeps changing both.
    _, _, free = _freeze_run(1.0, split)
    assert not all(torch.equal(w, free["w"][4]) for w in free["w"][4:])
    assert not all(np.array_equal(c, free["codes"][4]) for c in free["codes"][4:])
