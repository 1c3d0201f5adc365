"""sparks_tvm.torch layers: Sinkhorn, Hungarian, PSTE, codeword selection, binarization."""

import itertools

import numpy as np
import pytest
import torch

from sparks_tvm.errors import SparksError
from sparks_tvm.torch import (
    BinaryActivation,
    DenseBinaryConv2d,
    RandomCodebookConv2d,
    SparksConv2d,
    TemperatureSchedule,
)
from sparks_tvm.torch.codebook import all_codewords, code_strings, kernel_codes
from sparks_tvm.torch.layers import bireal_approx
from sparks_tvm.torch.sinkhorn import CodewordSelector, expand_permutation, hungarian, log_sinkhorn, pste


def test_codebook_is_all_512_kernels():
    book = all_codewords()
    assert book.shape == (512, 9)
    assert set(book.unique().tolist()) == {-1.0, 1.0}
    assert np.array_equal(kernel_codes(book.numpy()), np.arange(512))  # row c is code c
    assert code_strings([0, 1, 511]) == ["+++++++++", "-++++++++", "---------"]


@pytest.mark.parametrize("n,temp", [(7, 1.0), (64, 0.3), (512, 1.0)])
def test_sinkhorn_rows_and_columns_sum_to_one(n, temp):
    gen = torch.Generator().manual_seed(n)
    p = log_sinkhorn(torch.randn(n, n, generator=gen) / temp, n_iters=60)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(0), torch.ones(n), atol=1e-5, rtol=0)  # exact after the column step
    torch.testing.assert_close(p.sum(1), torch.ones(n), atol=1e-3, rtol=0)


@pytest.mark.parametrize("k", [1, 16, 64])
def test_slack_sinkhorn_equals_full_sinkhorn_with_tied_rows(k):
    # The cheaper form must be *exactly* the K read rows of the 512 x 512 Sinkhorn whose
    # unread rows are tied (here: all zero logits).
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(k, 512, generator=gen)
    full = log_sinkhorn(torch.cat([x, torch.zeros(512 - k, 512)]), n_iters=20)
    sel = CodewordSelector(k, 512, mode="slack")
    with torch.no_grad():
        soft = sel.soft(x)
    torch.testing.assert_close(soft, full[:k], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(soft.sum(1), torch.ones(k), atol=1e-3, rtol=0)
    assert torch.all(soft.sum(0) <= 1 + 1e-5)  # columns share their unit mass with the slack row


def test_sinkhorn_bad_input_names_the_problem():
    with pytest.raises(SparksError, match="needs row_mass"):
        log_sinkhorn(torch.zeros(3, 5))
    with pytest.raises(SparksError, match="add up to"):
        log_sinkhorn(torch.zeros(2, 5), row_mass=torch.ones(2))
    with pytest.raises(SparksError, match="2-D"):
        log_sinkhorn(torch.zeros(5))
    with pytest.raises(SparksError, match="not finite"):
        hungarian(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))


def test_hungarian_is_the_optimal_permutation():
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 5, 6):
        s = torch.randn(n, n, generator=gen)
        cols = hungarian(s)
        assert sorted(cols.tolist()) == list(range(n))
        best = max(itertools.permutations(range(n)), key=lambda p: sum(float(s[i, p[i]]) for i in range(n)))
        assert np.isclose(sum(float(s[i, cols[i]]) for i in range(n)), sum(float(s[i, best[i]]) for i in range(n)))


@pytest.mark.parametrize("mode", ["slack", "full"])
def test_hard_permutation_is_a_permutation(mode):
    sel = CodewordSelector(32, 512, mode=mode, generator=torch.Generator().manual_seed(1))
    sel.train()
    _, cols = sel()
    if mode == "full":
        full_cols = hungarian(sel.logits)
        assert sorted(full_cols.tolist()) == list(range(512))
    perm = expand_permutation(cols, 512)
    assert perm.shape == (512, 512)
    assert np.array_equal(perm.sum(0), np.ones(512)) and np.array_equal(perm.sum(1), np.ones(512))
    assert set(np.unique(perm).tolist()) == {0.0, 1.0}
    assert np.array_equal(perm[:32].argmax(1), cols)


def test_pste_value_is_hard_and_gradient_is_soft():
    soft = torch.rand(4, 6, requires_grad=True)
    hard = torch.zeros(4, 6)
    hard[torch.arange(4), torch.tensor([5, 0, 3, 1])] = 1
    out = pste(hard, soft)
    assert torch.equal(out, hard)  # bit-exact 0/1
    g = torch.randn(4, 6)
    (out * g).sum().backward()
    torch.testing.assert_close(soft.grad, g)


@pytest.mark.parametrize("mode", ["slack", "full"])
def test_pste_passes_gradients_to_the_selection_logits(mode):
    torch.manual_seed(0)
    conv = SparksConv2d(5, 7, codewords=16, stride=2, selection=mode, seed=2)
    conv.train()
    conv.selector.temperature, conv.selector.noise = 0.5, 1.0
    x = torch.randn(3, 5, 9, 11)
    y = conv(x)
    assert y.shape == (3, 7, 5, 6)
    (y * torch.randn_like(y)).sum().backward()
    g = conv.selector.logits.grad
    assert g is not None and torch.all(torch.isfinite(g)) and g.abs().sum() > 0
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [2, 16, 32, 64])
def test_selected_codewords_are_distinct_and_every_kernel_is_one_of_them(k):
    torch.manual_seed(k)
    conv = SparksConv2d(13, 21, codewords=k, seed=k)
    conv.train()
    seen = set()
    for _ in range(3):  # noisy training-mode selections too
        sel, cols = conv.selection()
        assert len(set(cols.tolist())) == k
        assert torch.equal(sel.sum(1), torch.ones(k))
        signs = conv.signs().detach()
        assert len(set(conv.last_codes.tolist())) == k
        assert set(kernel_codes(signs.numpy()).tolist()) <= set(conv.last_codes.tolist())
        seen.add(tuple(conv.last_codes.tolist()))
    assert len(seen) > 1  # the Gumbel noise does explore
    conv.eval()
    codes = conv.selected_codes()
    assert len(set(codes.tolist())) == k
    w = conv.export_weight()
    alpha = conv.weight.detach().abs().mean(dim=(1, 2, 3))
    # Exactly +-alpha_o per output channel: what the compiler's binary-weight check needs.
    assert torch.equal(w.abs(), alpha.view(-1, 1, 1, 1).expand_as(w))
    kernels = (w / alpha.view(-1, 1, 1, 1)).reshape(-1, 9)
    assert set(kernel_codes(kernels.numpy()).tolist()) <= set(codes.tolist())
    # ... and each is the nearest selected codeword (max inner product with the latent kernel).
    book = all_codewords()[torch.as_tensor(codes)]
    scores = conv.weight.detach().reshape(-1, 9) @ book.t()
    chosen = (kernels * conv.weight.detach().reshape(-1, 9)).sum(1)
    torch.testing.assert_close(chosen, scores.max(1).values)


def test_eval_selection_is_deterministic_and_noise_free():
    conv = SparksConv2d(4, 4, codewords=16, seed=5)
    conv.eval()
    a, b = conv.selected_codes(), conv.selected_codes()
    assert np.array_equal(a, b)
    assert np.array_equal(a, hungarian(conv.selector.logits))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(conv(x), conv(x))


def test_random_codebook_and_dense_baselines():
    snn = RandomCodebookConv2d(6, 10, codewords=32, seed=4)
    codes = snn.selected_codes()
    assert len(set(codes.tolist())) == 32
    assert np.array_equal(codes, RandomCodebookConv2d(6, 10, codewords=32, seed=4).selected_codes())
    assert not np.array_equal(codes, RandomCodebookConv2d(6, 10, codewords=32, seed=5).selected_codes())
    w = snn.export_weight()
    assert set(kernel_codes(torch.sign(w).numpy()).tolist()) <= set(codes.tolist())
    assert snn.bits_per_weight == pytest.approx(5 / 9)

    dense = DenseBinaryConv2d(6, 10, 3, stride=2)
    with torch.no_grad():
        dense.weight[0, 0, 0, 0] = 0.0  # zero latent weight -> +alpha, never 0
    w = dense.export_weight()
    alpha = dense.weight.detach().abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    assert torch.equal(w.abs(), alpha.expand_as(w)) and w[0, 0, 0, 0] > 0
    assert dense.bits_per_weight == 1.0
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    dense(x).sum().backward()
    assert dense.weight.grad.abs().sum() > 0


def test_binary_activation_is_sign_with_bireal_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0], requires_grad=True)
    y = BinaryActivation()(x)
    assert torch.equal(y.detach(), torch.sign(x.detach()))  # bit-exact, Sign(0) = 0
    y.sum().backward()
    expect = torch.where(x.detach().abs() < 1, 2 - 2 * x.detach().abs(), torch.zeros_like(x))
    torch.testing.assert_close(x.grad, expect)
    assert torch.equal(bireal_approx(torch.tensor([-5.0, 5.0])), torch.tensor([-1.0, 1.0]))
    with torch.no_grad():
        assert torch.equal(BinaryActivation()(x), torch.sign(x))


def test_layer_arguments_are_checked():
    with pytest.raises(SparksError, match="power of two"):
        SparksConv2d(4, 4, codewords=24)
    with pytest.raises(SparksError, match="integer in"):
        RandomCodebookConv2d(4, 4, codewords=1024)
    with pytest.raises(SparksError, match="in_channels"):
        SparksConv2d(0, 4)
    with pytest.raises(SparksError, match="'slack' or 'full'"):
        SparksConv2d(4, 4, selection="half")
    with pytest.raises(SparksError, match=r"expected input \(N, 4, H, W\)"):
        SparksConv2d(4, 4)(torch.zeros(1, 3, 5, 5))


def test_temperature_schedule():
    s = TemperatureSchedule(t0=1.0, t1=0.01, noise0=0.5, noise_end=0.5)
    assert s.at(0.0) == (1.0, 0.5)
    t, n = s.at(1.0)
    assert t == pytest.approx(0.01) and n == 0.0
    assert s.at(0.5)[1] == 0.0 and s.at(0.25)[1] == pytest.approx(0.25)
    assert s.at(0.5)[0] == pytest.approx(0.1)
    conv = SparksConv2d(2, 2, codewords=4)
    s.apply(conv, 0.25)
    assert conv.selector.temperature == pytest.approx(0.01 ** 0.25) and conv.selector.noise == pytest.approx(0.25)
    with pytest.raises(SparksError):
        TemperatureSchedule(t0=0.0)
