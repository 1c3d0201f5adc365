"""Gumbel-Sinkhorn permutation learning with the permutation straight-through estimator.

Sparks (SPARKS.md) selects, per layer, K = 2^tau distinct codewords out of the 512 binary
3x3 kernels by learning a permutation matrix P over the codebook: the sub-codebook is the
first K rows of ``P @ codebook``. Training uses

- the *soft* permutation ``Sinkhorn((X + g) / t)`` (Mena et al. 2018), computed in log space,
  with Gumbel noise ``g`` and temperature ``t``;
- the *hard* permutation: the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``)
  on the same noisy logits;
- PSTE: forward with the hard permutation, gradients through the soft one.

Two equivalent formulations are provided:

``"full"``
    The literal method: a 512 x 512 logit matrix, a 512 x 512 Sinkhorn and a 512 x 512
    Hungarian solve per step (tens of ms per layer on a CPU).
``"slack"`` (the default used for training)
    Only the K rows that are read (the sub-codebook) carry logits; the other 512 - K rows of
    the permutation are tied to a constant row without noise and collapsed into one *slack*
    row of mass 512 - K. Sinkhorn on identical rows keeps them identical, so the K rows of
    the collapsed (K + 1) x 512 Sinkhorn are *exactly* the K rows of the full 512 x 512
    Sinkhorn whose other rows are tied (a test checks it); and the full Hungarian solve with
    tied rows reduces to the rectangular K x 512 assignment (the tied rows add a constant
    whatever columns they take). It still yields K distinct codewords by construction, at
    (K + 1) / 512 of the cost: about 1 ms per layer and step instead of tens.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import SparksError

#: Sinkhorn iterations used in training (Mena et al. use about 20).
DEFAULT_ITERS = 20


def sample_gumbel(shape, generator: torch.Generator | None = None, eps: float = 1e-20,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(U))``, U uniform in (0, 1)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return -torch.log(-torch.log(u + eps) + eps)


def log_sinkhorn(log_alpha: torch.Tensor, n_iters: int = DEFAULT_ITERS,
                 row_mass: torch.Tensor | None = None) -> torch.Tensor:
    """Sinkhorn normalisation in log space; returns the (soft) doubly stochastic matrix.

    Alternately normalises rows to their mass and columns to 1, ending with a column step,
    so column sums are exact and row sums converge.

    Parameters
    ----------
    log_alpha : Tensor, (R, N)
        Logits already divided by the temperature.
    n_iters : int
        Number of (row, column) normalisation pairs.
    row_mass : Tensor, (R,), optional
        Target sum of each row (default all ones, which needs R == N). The slack form passes
        ones for the K real rows and ``N - K`` for the slack row; the masses must add to N.

    Returns
    -------
    Tensor, (R, N)
        ``exp`` of the normalised logits.
    """
    if log_alpha.dim() != 2:
        raise SparksError(f"log_sinkhorn expects a 2-D logit matrix, got shape {tuple(log_alpha.shape)}")
    rows, cols = log_alpha.shape
    if row_mass is None:
        if rows != cols:
            raise SparksError(f"a {rows}x{cols} logit matrix needs row_mass (rows must add up to {cols} columns)")
        log_mass = None
    else:
        if row_mass.shape != (rows,):
            raise SparksError(f"row_mass has shape {tuple(row_mass.shape)}, expected ({rows},)")
        if not math.isclose(float(row_mass.sum()), cols, rel_tol=1e-6):
            raise SparksError(f"row masses add up to {float(row_mass.sum())}, expected {cols} (one per column)")
        log_mass = torch.log(row_mass.to(log_alpha.dtype)).unsqueeze(1)
    la = log_alpha
    for _ in range(n_iters):
        la = la - torch.logsumexp(la, dim=1, keepdim=True)
        if log_mass is not None:
            la = la + log_mass
        la = la - torch.logsumexp(la, dim=0, keepdim=True)
    return torch.exp(la)


def hungarian(scores: torch.Tensor) -> np.ndarray:
    """Maximum-weight assignment of the rows of ``scores`` (R <= N) to distinct columns.

    Returns
    -------
    ndarray, int64, (R,)
        ``cols[r]`` is the column given to row r; all distinct.
    """
    s = scores.detach().to(torch.float64).cpu().numpy()
    if not np.all(np.isfinite(s)):
        raise SparksError("selection logits are not finite (NaN/inf): training diverged")
    rows, cols = linear_sum_assignment(s, maximize=True)
    out = np.empty(s.shape[0], np.int64)
    out[rows] = cols
    return out


def one_hot_rows(cols: np.ndarray, n: int, like: torch.Tensor) -> torch.Tensor:
    """The (R, n) 0/1 matrix with a single 1 per row at ``cols[r]``."""
    hard = torch.zeros(len(cols), n, dtype=like.dtype, device=like.device)
    hard[torch.arange(len(cols)), torch.as_tensor(cols, device=like.device)] = 1.0
    return hard


def expand_permutation(cols: np.ndarray, n: int) -> np.ndarray:
    """Complete a partial assignment of the first rows to a full n x n permutation matrix.

    The rows past ``len(cols)`` (the tied rows of the slack form) take the unused columns in
    increasing order: with tied rows every completion is an optimal one.
    """
    used = np.zeros(n, bool)
    used[cols] = True
    full_cols = np.concatenate([cols, np.flatnonzero(~used)])
    perm = np.zeros((n, n), np.float32)
    perm[np.arange(n), full_cols] = 1.0
    return perm


def pste(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Permutation straight-through estimator: value ``hard``, gradient of ``soft``.

    Written ``hard + (soft - soft.detach())`` rather than ``hard - soft.detach() + soft`` so
    the forward value is bit-exact 0/1 (``x - x`` is exactly 0 in floating point, while
    ``(1 - s) + s`` may round away from 1).
    """
    return hard + (soft - soft.detach())


class CodewordSelector(torch.nn.Module):
    """Learned selection of K distinct rows (codewords) out of N by Gumbel-Sinkhorn + PSTE.

    Parameters
    ----------
    k : int
        Number of codewords to select.
    n : int
        Size of the full codebook (512 for 3x3 binary kernels).
    mode : {"slack", "full"}
        See the module docstring. ``"full"`` learns an N x N logit matrix.
    n_iters : int
        Sinkhorn iterations.
    init_std : float
        Standard deviation of the initial logits (random initial selection).
    generator : torch.Generator, optional
        Source of the initial logits (fixed seeds).

    Attributes
    ----------
    temperature : float
        Sinkhorn temperature t (set by a schedule during training).
    noise : float
        Scale of the Gumbel noise added to the logits in training mode (0 disables it).
    """

    def __init__(self, k: int, n: int = 512, mode: str = "slack", n_iters: int = DEFAULT_ITERS,
                 init_std: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        if mode not in ("slack", "full"):
            raise SparksError(f"selection mode must be 'slack' or 'full', got {mode!r}")
        if not 1 <= k <= n:
            raise SparksError(f"cannot select {k} codewords out of {n}")
        self.k, self.n, self.mode, self.n_iters = int(k), int(n), mode, int(n_iters)
        rows = k if mode == "slack" else n
        self.logits = torch.nn.Parameter(torch.randn(rows, n, generator=generator) * init_std)
        self.temperature = 1.0
        self.noise = 1.0

    def _noisy_logits(self) -> torch.Tensor:
        if self.training and self.noise > 0:
            g = sample_gumbel(self.logits.shape, device=self.logits.device, dtype=self.logits.dtype)
            return self.logits + self.noise * g
        return self.logits

    def selected(self) -> np.ndarray:
        """Indices of the K selected codewords without noise (the inference selection)."""
        with torch.no_grad():
            return hungarian(self.logits)[: self.k]

    def soft(self, noisy: torch.Tensor) -> torch.Tensor:
        """The K read rows of the soft permutation for the given noisy logits."""
        la = noisy / self.temperature
        if self.mode == "full":
            return log_sinkhorn(la, self.n_iters)[: self.k]
        # Slack form: the tied rows have logit 0 (any constant: Sinkhorn is shift-invariant per
        # row) and are collapsed into one row of mass n - k.
        slack = torch.zeros(1, self.n, dtype=la.dtype, device=la.device)
        mass = torch.ones(self.k + 1, dtype=la.dtype, device=la.device)
        mass[-1] = self.n - self.k
        if self.k == self.n:
            return log_sinkhorn(la, self.n_iters)
        return log_sinkhorn(torch.cat([la, slack]), self.n_iters, row_mass=mass)[: self.k]

    @torch.no_grad()
    def set_selection(self, codes, margin: float = 1.0) -> None:
        """Logits whose noise-free selection is exactly ``codes`` (K distinct columns).

        Each row becomes 0 everywhere and ``margin`` at its column (slack form: rows are the
        sub-codebook slots). A small margin keeps the selection learnable: Gumbel noise and
        gradients can still move a slot to a better codeword.
        """
        codes = np.asarray(codes, np.int64)
        if self.mode != "slack":
            raise SparksError("set_selection needs the 'slack' selection form")
        if codes.shape != (self.k,) or len(set(codes.tolist())) != self.k or codes.min() < 0 or codes.max() >= self.n:
            raise SparksError(f"set_selection needs {self.k} distinct codes in [0, {self.n}), got {codes.tolist()}")
        self.logits.zero_()
        self.logits[torch.arange(self.k), torch.as_tensor(codes)] = float(margin)

    def forward(self) -> tuple[torch.Tensor, np.ndarray]:
        """The (K, N) selection matrix: exact 0/1 one-hot rows; PSTE gradient when training.

        Returns
        -------
        (Tensor, ndarray)
            The selection matrix and the selected column of each row.
        """
        noisy = self._noisy_logits()
        cols = hungarian(noisy)[: self.k]
        hard = one_hot_rows(cols, self.n, self.logits)
        # Frozen logits (requires_grad False) need no soft permutation: skipping its Sinkhorn
        # saves most of a Sparks layer's per-step overhead once the selection is fixed.
        if not (self.training and torch.is_grad_enabled() and self.logits.requires_grad):
            return hard, cols
        return pste(hard, self.soft(noisy)), cols
