"""Example Sparks networks in PyTorch, exported with torch's own ONNX exporter.

The weights are random but *Sparks-structured*: every 3x3 kernel of a block conv is one of
K distinct codewords of its layer, times a per-output-channel alpha. Parameters are drawn
from coarse dyadic grids (multiples of 1/4, powers of two for scales, BatchNorm eps = 0 with
variances 4^j), so that float32 arithmetic on them is exact in both onnxruntime and TVM and
whole-model outputs can be compared tightly rather than up to sign flips near zero.
"""

from __future__ import annotations

import io

import numpy as np


def _torch():
    import torch

    return torch


def random_codebook(rng: np.random.Generator, k: int) -> np.ndarray:
    """K distinct 3x3 codewords in {-1, +1} (no pair c, -c, so K is unambiguous)."""
    chosen, seen = [], set()
    for code in rng.permutation(512):
        if code in seen or (511 ^ code) in seen:
            continue
        seen.add(int(code))
        chosen.append(code)
        if len(chosen) == k:
            break
    bits = (np.array(chosen)[:, None] >> np.arange(9)) & 1
    return (1 - 2 * bits).astype(np.float32).reshape(k, 3, 3)


def _dyadic(rng, shape, lo, hi, step=0.25):
    vals = np.arange(lo, hi + step / 2, step)
    vals = vals[vals != 0] if lo < 0 < hi else vals
    return rng.choice(vals, size=shape).astype(np.float32)


def make_modules():
    """Build the torch module classes lazily (torch is imported only when used)."""
    torch = _torch()
    activation, conv = _layer_classes(torch)
    block = _block_class(torch, activation, conv)
    return {"BinaryActivation": activation, "SparksConv2d": conv,
            "BasicBinaryBlock": block, "SparksResNet": _resnet_class(torch, block)}


def _layer_classes(torch):
    """``(BinaryActivation, SparksConv2d)``."""
    nn = torch.nn

    class BinaryActivation(nn.Module):
        """sign(x) forward; ``ste`` picks how the straight-through gradient is written.

        ``"none"``: plain ``torch.sign``; ``"detach"``: ``x + (sign(x) - x).detach()``;
        ``"bireal"``: Bi-Real's ``sign(x).detach() - p(x).detach() + p(x)`` with the piecewise
        polynomial p. The last two leave Sub/Add residues in the exported graph.
        """

        def __init__(self, ste: str = "none", zero: str = "sign"):
            super().__init__()
            self.ste, self.zero = ste, zero

        def _forward_value(self, x):
            if self.zero == "ge":
                return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
            return torch.sign(x)

        def forward(self, x):
            b = self._forward_value(x)
            if self.ste == "detach":
                return x + (b - x).detach()
            if self.ste == "bireal":
                m1 = (x < -1).float()
                m2 = (x < 0).float()
                m3 = (x < 1).float()
                p = -1 * m1 + (x * x + 2 * x) * (1 - m1) * m2 + (-x * x + 2 * x) * (1 - m2) * m3 + (1 - m3)
                return b.detach() - p.detach() + p
            return b

    class SparksConv2d(nn.Module):
        """Inference form of a Sparks conv: ``alpha_o * codebook[idx[o, i]]`` as the kernel."""

        def __init__(self, codebook, idx, alpha, stride=1):
            super().__init__()
            weight = alpha.reshape(-1, 1, 1, 1) * codebook[idx]
            self.register_buffer("weight", torch.from_numpy(np.ascontiguousarray(weight)))
            self.stride = stride

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight, stride=self.stride, padding=1)

    return BinaryActivation, SparksConv2d


def _block_class(torch, BinaryActivation, SparksConv2d):  # noqa: N803 - classes
    """``BasicBinaryBlock`` over the given activation and conv classes."""
    nn = torch.nn

    class BasicBinaryBlock(nn.Module):
        """Bi-Real/ReActNet block: RSign -> Sparks conv -> BN -> + shortcut -> RPReLU."""

        def __init__(self, rng, cin, cout, stride, k, ste="none", zero="sign"):
            super().__init__()
            self.move0 = nn.Parameter(torch.from_numpy(_dyadic(rng, (1, cin, 1, 1), -0.5, 0.5)))
            self.act = BinaryActivation(ste, zero)
            codebook = random_codebook(rng, k)
            idx = rng.integers(0, k, size=(cout, cin))
            idx[: min(cout, k), 0] = np.arange(min(cout, k))  # every codeword used
            alpha = rng.choice([0.25, 0.5, 1.0], size=cout).astype(np.float32)
            self.conv = SparksConv2d(codebook, idx, alpha, stride)
            self.bn = _dyadic_bn(torch, rng, cout)
            self.shortcut = None
            if stride != 1 or cin != cout:
                # Float downsample shortcut (kept full precision, as in Bi-Real/ReActNet).
                self.shortcut = nn.Sequential(
                    nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity(),
                    _dyadic_conv(torch, rng, cin, cout, 1),
                    _dyadic_bn(torch, rng, cout),
                )
            self.move1 = nn.Parameter(torch.from_numpy(_dyadic(rng, (1, cout, 1, 1), -0.5, 0.5)))
            self.prelu = nn.PReLU(cout, init=0.5)
            self.move2 = nn.Parameter(torch.from_numpy(_dyadic(rng, (1, cout, 1, 1), -0.5, 0.5)))

        def forward(self, x):
            out = self.bn(self.conv(self.act(x + self.move0)))
            out = out + (x if self.shortcut is None else self.shortcut(x))
            return self.prelu(out + self.move1) + self.move2

    return BasicBinaryBlock


def _dyadic_conv(torch, rng, cin, cout, ksize, stride=1, padding=0):
    conv = torch.nn.Conv2d(cin, cout, ksize, stride=stride, padding=padding, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(_dyadic(rng, conv.weight.shape, -0.5, 0.5)))
    return conv

def _dyadic_bn(torch, rng, c):
    bn = torch.nn.BatchNorm2d(c, eps=0.0)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.choice([0.25, 0.5, 1.0], size=c).astype(np.float32)))
        bn.weight.mul_(torch.from_numpy(rng.choice([-1.0, 1.0], size=c, p=[0.25, 0.75]).astype(np.float32)))
        bn.bias.copy_(torch.from_numpy(_dyadic(rng, c, -1.0, 1.0)))
        bn.running_mean.copy_(torch.from_numpy(_dyadic(rng, c, -2.0, 2.0)))
        bn.running_var.copy_(torch.from_numpy(rng.choice([1.0, 4.0, 16.0], size=c).astype(np.float32)))
    return bn


def _resnet_class(torch, BasicBinaryBlock):  # noqa: N803 - a class
    """``SparksResNet`` of the given blocks."""
    nn = torch.nn

    class SparksResNet(nn.Module):
        """Bi-Real-style ResNet: float stem, 2 Sparks convs per basic block, float head."""

        def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), k=16, num_classes=1000,
                     stem="imagenet", seed=0, ste="none", zero="sign"):
            super().__init__()
            rng = np.random.default_rng(seed)
            ks = k if isinstance(k, (list, tuple)) else [k] * (2 * sum(blocks))
            if stem == "imagenet":
                self.stem = nn.Sequential(
                    _dyadic_conv(torch, rng, 3, widths[0], 7, stride=2, padding=3), _dyadic_bn(torch, rng, widths[0]),
                    nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                )
            else:
                self.stem = nn.Sequential(_dyadic_conv(torch, rng, 3, widths[0], 3, padding=1), _dyadic_bn(torch, rng, widths[0]))
            layers, cin, li = [], widths[0], 0
            for stage, (width, nblk) in enumerate(zip(widths, blocks)):
                for b in range(nblk):
                    stride = 2 if (stage > 0 and b == 0) else 1
                    # Basic block = two binary convs, each with its own shortcut (Bi-Real).
                    layers.append(BasicBinaryBlock(rng, cin, width, stride, ks[li], ste, zero))
                    layers.append(BasicBinaryBlock(rng, width, width, 1, ks[li + 1], ste, zero))
                    cin, li = width, li + 2
            self.blocks = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(_dyadic(rng, self.fc.weight.shape, -0.5, 0.5)))
                self.fc.bias.copy_(torch.from_numpy(_dyadic(rng, num_classes, -1.0, 1.0)))

        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.fc(torch.flatten(self.pool(x), 1))

    return SparksResNet


def sparks_resnet18(k=16, seed=0, **kw):
    """Bi-Real/ReActNet ResNet-18 for 224x224 input with 16 Sparks block convs."""
    return make_modules()["SparksResNet"](k=k, seed=seed, **kw).eval()


def sparks_resnet_tiny(k=8, seed=0, widths=(16, 24), blocks=(1, 1), num_classes=10, **kw):
    """A small variant for tests (CIFAR-style 3x3 stem): odd channel counts, stride 2."""
    return make_modules()["SparksResNet"](widths=widths, blocks=blocks, k=k, num_classes=num_classes,
                                          stem="cifar", seed=seed, **kw).eval()


def export_onnx(module, input_shape, path=None, input_name="input", opset=17) -> bytes:
    """Export with torch's TorchScript-based ONNX exporter (folds BN into the conv weights,
    as most users' exports do). Returns the model bytes and writes ``path`` if given."""
    torch = _torch()
    buf = io.BytesIO()
    x = torch.zeros(*input_shape)
    with torch.no_grad():
        torch.onnx.export(module, (x,), buf, input_names=[input_name], output_names=["output"],
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    data = buf.getvalue()
    if path is not None:
        with open(path, "wb") as fh:
            fh.write(data)
    return data


def example_input(shape, seed=0) -> np.ndarray:
    """Integer-valued input in [-4, 4] (exact in float32 through the dyadic model)."""
    return np.random.default_rng(seed).integers(-4, 5, size=shape).astype(np.float32)
