"""The BOPs cost model reproduces SPARKS.md's ResNet-18 figures."""

import pytest

from sparks_tvm.cost import bits_per_weight, dense_bops, sparks_bops, sparks_is_cheaper

# (cin, cout, out side) of the 16 binary 3x3 convs of ResNet-18 at 224x224.
RESNET18 = [(64, 64, 56)] * 4 + [(64, 128, 28)] + [(128, 128, 28)] * 3 + [(128, 256, 14)] + \
           [(256, 256, 14)] * 3 + [(256, 512, 7)] + [(512, 512, 7)] * 3


@pytest.mark.parametrize("k,expect_g", [(16, 0.297), (32, 0.501), (64, 0.883)])
def test_resnet18_bops(k, expect_g):
    total = sum(sparks_bops(ci, co, hw * hw, k) for ci, co, hw in RESNET18)
    assert abs(total / 1e9 - expect_g) <= 1e-3  # published figures are rounded/truncated


def test_dense_resnet18_bops():
    assert abs(sum(dense_bops(ci, co, hw * hw) for ci, co, hw in RESNET18) / 1e9 - 1.677) <= 1e-3


def test_choice_and_bits():
    assert sparks_is_cheaper(64, 64, 3136, 16) and not sparks_is_cheaper(64, 64, 3136, 64)
    assert bits_per_weight(16) == pytest.approx(4 / 9) and bits_per_weight(64) == pytest.approx(6 / 9)
