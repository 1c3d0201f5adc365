"""Trainable binary layers: Bi-Real activation, dense BNN conv, SNN-style and Sparks convs.

All binary convs share one forward: ``conv2d(x, alpha_o * B, stride, padding)`` where B holds
+-1 kernels and ``alpha_o = mean |W_o|`` is the per-output-channel scale of the real-valued
latent weights W (XNOR-Net / ReActNet). They differ in how B is made from W:

- :class:`DenseBinaryConv2d` (plain BNN): ``B = sign(W)`` tap by tap (0 -> +1), 1 bit/weight.
- :class:`RandomCodebookConv2d` (SNN-style baseline): each 3x3 kernel becomes the nearest of K
  fixed random codewords, tau/9 bits/weight.
- :class:`SparksConv2d`: the same, with the K codewords *learned* by Gumbel-Sinkhorn and
  PSTE (:mod:`sparks_tvm.torch.sinkhorn`).

"Nearest" is SPARKS.md's: the codeword c maximising <w, c> for the real-valued kernel w (all
codewords have the same norm 3). Gradients reach W straight through (identity), and the
Sparks selection logits through the soft permutation. Forward values are bit-exact: every
kernel of ``binarized_weight()`` is exactly ``+-alpha_o`` times a selected codeword, so the
exported ONNX constant-folds to what the compiler recognises.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cost import bits_per_weight
from ..errors import SparksError
from .codebook import NUM_CODEWORDS, TAPS, all_codewords, random_codes
from .sinkhorn import CodewordSelector


def _ste(value: torch.Tensor, grad_source: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` exactly, backward the gradient of ``grad_source`` (x - x is exact 0)."""
    return value + (grad_source - grad_source.detach())


def bireal_approx(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's piecewise polynomial approximation of sign (gradient 2 - 2|x| on [-1, 1])."""
    return torch.where(x < -1, -torch.ones_like(x),
                       torch.where(x < 0, x * x + 2 * x,
                                   torch.where(x < 1, -x * x + 2 * x, torch.ones_like(x))))


class _SignBiReal(torch.autograd.Function):
    """``sign`` forward, the derivative of :func:`bireal_approx`, ``max(0, 2 - 2|x|)``, backward.

    The same gradient as ``_ste(sign(x), bireal_approx(x))`` in one elementwise kernel each
    way: the ``where`` chain of the composed form took about half of a training step on the CPU.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp_(min=0.0)


class BinaryActivation(nn.Module):
    """``sign(x)`` forward (ONNX ``Sign``: 0 -> 0), Bi-Real's polynomial gradient backward.

    With gradients off (evaluation, export) it is exactly ``torch.sign``, which exports to a
    single ONNX ``Sign`` node. Sign(0) = 0 is what the compiler implements for ``Sign``
    (a zero activation contributes nothing), so torch and the compiled model agree on it.
    """

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _SignBiReal.apply(x)
        return torch.sign(x)


def _check_conv_args(name, in_channels, out_channels, stride, padding):
    for what, v in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise SparksError(f"{name}: {what} must be a positive integer, got {v!r}")
    if not isinstance(padding, (int, np.integer)) or padding < 0:
        raise SparksError(f"{name}: padding must be a non-negative integer, got {padding!r}")


class BinaryConv2dBase(nn.Module):
    """Shared parts of the binary convs: latent weights, alpha, conv, export weight.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        3 for the codebook convs (codewords are 3x3).
    stride, padding : int
        Zero padding is applied to the binarized activations, as in the compiler's models.
    """

    #: Codewords per layer (None: dense binary, every kernel free).
    codewords: int | None = None

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1):
        super().__init__()
        _check_conv_args(type(self).__name__, in_channels, out_channels, stride, padding)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's initialisation

    def alpha(self) -> torch.Tensor:
        """Per-output-channel scale mean |W_o| (gradient flows into W, as in XNOR-Net)."""
        return self.weight.abs().mean(dim=(1, 2, 3))

    def signs(self) -> torch.Tensor:
        """The +-1 kernels B, (O, I, k, k); straight-through gradient to the latent weights."""
        raise NotImplementedError

    def binarized_weight(self) -> torch.Tensor:
        """``alpha_o * B``: the weight the conv uses (exact +-alpha_o entries)."""
        return self.alpha().view(-1, 1, 1, 1) * self.signs()

    @torch.no_grad()
    def export_weight(self) -> torch.Tensor:
        """The inference weight (no noise, no gradient), as a constant for ONNX export."""
        was = self.training
        self.eval()
        try:
            return self.binarized_weight().detach().clone()
        finally:
            self.train(was)

    @property
    def bits_per_weight(self) -> float:
        return 1.0 if self.codewords is None else bits_per_weight(self.codewords)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise SparksError(f"{type(self).__name__}: expected input (N, {self.in_channels}, H, W), "
                              f"got {tuple(x.shape)}")
        return F.conv2d(x, self.binarized_weight(), stride=self.stride, padding=self.padding)

    def extra_repr(self):
        k = "" if self.codewords is None else f", codewords={self.codewords}"
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}{k}"


class DenseBinaryConv2d(BinaryConv2dBase):
    """Plain BNN conv: every tap is ``sign(w)`` (0 -> +1, a weight must be +-1), 1 bit/weight."""

    def signs(self):
        w = self.weight
        return _ste(torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w)), w)


class CodebookConv2dBase(BinaryConv2dBase):
    """A 3x3 binary conv whose kernels are the nearest of K codewords (max inner product)."""

    def __init__(self, in_channels, out_channels, codewords=16, stride=1, padding=1):
        super().__init__(in_channels, out_channels, 3, stride, padding)
        if not isinstance(codewords, (int, np.integer)) or not 1 <= codewords <= NUM_CODEWORDS:
            raise SparksError(f"{type(self).__name__}: codewords must be an integer in [1, 512], got {codewords!r}")
        if codewords & (codewords - 1):
            raise SparksError(f"{type(self).__name__}: codewords must be a power of two (K = 2^tau), got {codewords}")
        self.codewords = int(codewords)
        self.register_buffer("book", all_codewords(), persistent=False)

    def selection(self) -> tuple[torch.Tensor, np.ndarray]:
        """(K, 512) 0/1 selection matrix (PSTE gradient for Sparks) and the selected codes."""
        raise NotImplementedError

    def selected_codes(self) -> np.ndarray:
        """The K selected codeword codes (inference selection), in slot order."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return np.asarray(self.selection()[1], np.int64)
        finally:
            self.train(was)

    def assign(self, codebook: torch.Tensor) -> torch.Tensor:
        """Slot index of the nearest codeword for every kernel, (O, I)."""
        flat = self.weight.detach().reshape(-1, TAPS)
        return torch.argmax(flat @ codebook.detach().t(), dim=1).view(self.out_channels, self.in_channels)

    def signs(self):
        sel, cols = self.selection()
        self.last_codes = np.asarray(cols, np.int64)  # the (possibly noisy) selection just used
        codebook = sel @ self.book  # (K, 9); exact +-1 values, gradient to the selection
        idx = self.assign(codebook)
        kernels = codebook[idx.reshape(-1)].view(self.out_channels, self.in_channels, 3, 3)
        return _ste(kernels, self.weight)


class FixedCodebookConv2d(CodebookConv2dBase):
    """A codebook conv whose K codewords are given and never learned.

    Used for the "count, don't learn" baseline: the K most frequent kernels of a trained dense
    BNN (:func:`sparks_tvm.torch.train.top_k_codes`), set with :meth:`set_codes`. Until then
    it holds codewords 0..K-1.
    """

    def __init__(self, in_channels, out_channels, codewords=16, stride=1, padding=1):
        super().__init__(in_channels, out_channels, codewords, stride, padding)
        self.register_buffer("codes", torch.arange(self.codewords, dtype=torch.int64))

    @torch.no_grad()
    def set_codes(self, codes) -> None:
        """Use the K distinct codes ``codes`` (integers in [0, 512))."""
        codes = torch.as_tensor(np.asarray(codes, np.int64))
        if codes.shape != (self.codewords,) or codes.unique().numel() != self.codewords \
                or int(codes.min()) < 0 or int(codes.max()) >= NUM_CODEWORDS:
            raise SparksError(f"{type(self).__name__}: need {self.codewords} distinct codes in [0, 512), "
                              f"got {codes.tolist()}")
        self.codes.copy_(codes)

    def selection(self):
        codes = self.codes.numpy()
        sel = torch.zeros(self.codewords, NUM_CODEWORDS, dtype=self.book.dtype, device=self.book.device)
        sel[torch.arange(self.codewords), self.codes] = 1.0
        return sel, codes


class RandomCodebookConv2d(FixedCodebookConv2d):
    """SNN-style baseline: K distinct codewords drawn at random once and kept fixed.

    Parameters
    ----------
    seed : int
        Seed of the codeword draw (fixed seeds give comparable runs).
    """

    def __init__(self, in_channels, out_channels, codewords=16, stride=1, padding=1, seed=0):
        super().__init__(in_channels, out_channels, codewords, stride, padding)
        gen = torch.Generator().manual_seed(int(seed))
        self.set_codes(random_codes(self.codewords, gen))


class SparksConv2d(CodebookConv2dBase):
    """Sparks conv: K = 2^tau codewords learned by Gumbel-Sinkhorn with PSTE.

    Parameters
    ----------
    in_channels, out_channels : int
    codewords : int
        K, a power of two (16, 32, 64 in the paper).
    stride, padding : int
    selection : {"slack", "full"}
        ``"slack"`` (default) learns only the K read rows of the permutation; ``"full"`` the
        512 x 512 matrix. See :mod:`sparks_tvm.torch.sinkhorn` for why they are equivalent.
    sinkhorn_iters : int
    seed : int
        Seed of the initial (random) selection logits.

    Notes
    -----
    The temperature and the Gumbel noise scale live on ``self.selector`` and are set by
    :class:`sparks_tvm.torch.train.TemperatureSchedule`. In eval mode the selection is the
    noise-free Hungarian solution, so inference is deterministic.
    """

    def __init__(self, in_channels, out_channels, codewords=16, stride=1, padding=1,
                 selection="slack", sinkhorn_iters=20, seed=0):
        super().__init__(in_channels, out_channels, codewords, stride, padding)
        gen = torch.Generator().manual_seed(int(seed))
        self.selector = CodewordSelector(self.codewords, NUM_CODEWORDS, mode=selection,
                                         n_iters=sinkhorn_iters, generator=gen)

    def selection(self):
        return self.selector()

    @torch.no_grad()
    def set_selection(self, codes, margin: float = 1.0) -> None:
        """Start the learned selection at the given K distinct codewords (slack form only).

        Slot r's logits get ``margin`` on ``codes[r]`` and 0 elsewhere
        (:meth:`CodewordSelector.set_selection`), so the noise-free Hungarian solution is
        exactly ``codes`` until training moves the logits (top-K initialisation from a
        trained dense BNN's kernels).
        """
        self.selector.set_selection(codes, margin)


def binary_convs(model: nn.Module) -> list[tuple[str, BinaryConv2dBase]]:
    """(name, layer) of every binary conv in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BinaryConv2dBase)]
