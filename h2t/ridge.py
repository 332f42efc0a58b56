"""A closed-form ridge-regression probe, the baseline of big_vision's few-shot evaluator.

    params = h2t.ridge.fit(x, labels, num_classes=10, l2_reg=1024.0)
    logits = h2t.probe.predict(params, x_test)

No optimiser and no steps: the features are standardised (training mean and
std, plus 1e-5), a constant column of `BIAS_CONSTANT` stands in for the bias
(so the bias is all but unpenalised), and the weights minimise

    || A W - Y ||^2 + l2_reg || W ||^2,    Y = 2 one_hot(labels) - 1 in {-1, 1},

with `A [n, d + 1]` the augmented design matrix. The solution goes through an
eigendecomposition of the smaller Gram matrix: `A^T A [d+1, d+1]` when
n > d + 1, else the dual `A A^T [n, n]`, so a few hundred examples with tens of
thousands of features cost an `n x n` problem. One decomposition serves any
`l2_reg`, which makes the cross-validation over a grid (`select_l2_reg`)
cheap. The standardisation is folded into the returned weights, so they
apply to raw features like any other `h2t.probe` head.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# big_vision's constants: the bias column's value, the std floor, its default l2.
BIAS_CONSTANT = 100.0
STD_EPS = 1e-5
DEFAULT_L2_REG = 2.0**10
# Powers of 4 around the default; features are standardised, so the scale of
# a useful l2_reg follows the number of examples, not the features' units.
L2_REGS = tuple(2.0**k for k in range(-4, 21, 2))


class Solver:
  """Ridge solutions for any `l2_reg` from one eigendecomposition.

  Attributes:
    mean, std: `[d]` standardisation statistics of the training features.
  """

  def __init__(self, x: np.ndarray, labels: np.ndarray, num_classes: int):
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels):
      raise ValueError(f"expected features [n, d] and labels [n], got {x.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
    self.mean = x.mean(axis=0)
    self.std = x.std(axis=0) + STD_EPS
    a = design_matrix(x, self.mean, self.std)
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    n, dim = a.shape
    # W(l2) = left @ diag(1 / (eigs + l2)) @ right, in both the primal and the dual form.
    if n > dim:
      self.eigs, q = np.linalg.eigh(a.T @ a)
      self.left, self.right = q, q.T @ (a.T @ y)
    else:
      self.eigs, q = np.linalg.eigh(a @ a.T)
      self.left, self.right = a.T @ q, q.T @ y
    # Round-off can leave tiny negative eigenvalues of a PSD Gram matrix.
    self.eigs = np.maximum(self.eigs, 0.0)

  def weights(self, l2_reg: float) -> np.ndarray:
    """`[d + 1, classes]` weights on the augmented, standardised features."""
    if not l2_reg > 0:
      raise ValueError(f"l2_reg={l2_reg}; expected a positive number")
    return (self.left / (self.eigs + l2_reg)) @ self.right

  def params(self, l2_reg: float, dtype=np.float32) -> dict[str, np.ndarray]:
    """Weights for raw features: `{'w': [d, classes], 'b': [classes]}` (float32 by default)."""
    w_aug = self.weights(l2_reg)
    w = w_aug[:-1] / self.std[:, None]
    b = BIAS_CONSTANT * w_aug[-1] - self.mean @ w
    return {"w": w.astype(dtype), "b": b.astype(dtype)}


def design_matrix(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """`[n, d]` features -> `[n, d + 1]` standardised features with the bias column."""
  z = (np.asarray(x, np.float64) - mean) / std
  return np.concatenate([z, np.full((len(z), 1), BIAS_CONSTANT)], axis=1)


def fit(
  x: np.ndarray, labels: np.ndarray, *, num_classes: int, l2_reg: float = DEFAULT_L2_REG
) -> dict[str, np.ndarray]:
  """Solves the ridge probe in closed form.

  Args:
    x: `[n, d]` training features.
    labels: `[n]` int labels in [0, num_classes).
    num_classes: output width.
    l2_reg: penalty on the squared weights of the standardised features
      (big_vision's default 1024).

  Returns:
    `{'w': [d, classes], 'b': [classes]}` float32, for `h2t.probe.predict`.
  """
  return Solver(x, labels, num_classes).params(l2_reg)


def select_l2_reg(
  x: np.ndarray,
  labels: np.ndarray,
  *,
  num_classes: int,
  l2_regs: Sequence[float] = L2_REGS,
  num_folds: int = 5,
  seed: int = 0,
) -> tuple[float, np.ndarray]:
  """Picks `l2_reg` by k-fold cross-validated accuracy on the training set.

  Folds are a seeded random partition, so that a training set ordered by
  class still gives every fold every class. Each fold costs one
  eigendecomposition, shared by the whole grid. Ties go to the larger
  `l2_reg` (the simpler model).

  Args:
    x: `[n, d]` training features.
    labels: `[n]` int labels.
    num_classes: output width.
    l2_regs: the grid.
    num_folds: k; needs at least k examples.
    seed: the partition's seed.

  Returns:
    `(best l2_reg, mean validation accuracy of each grid value [len(l2_regs)])`.
  """
  x = np.asarray(x)
  labels = np.asarray(labels)
  if not 2 <= num_folds <= len(labels):
    raise ValueError(f"num_folds={num_folds}; expected 2 <= num_folds <= n = {len(labels)}")
  if not l2_regs:
    raise ValueError("l2_regs is empty; give at least one value")
  folds = np.array_split(np.random.default_rng(seed).permutation(len(labels)), num_folds)
  acc = np.zeros(len(l2_regs))
  for valid in folds:
    train = np.setdiff1d(np.arange(len(labels)), valid)
    solver = Solver(x[train], labels[train], num_classes)
    for i, l2 in enumerate(l2_regs):
      params = solver.params(l2)
      pred = (np.asarray(x[valid], np.float64) @ params["w"] + params["b"]).argmax(-1)
      acc[i] += (pred == labels[valid]).mean() / num_folds
  # argmax of the reversed grid: the largest l2_reg among the best.
  order = np.argsort(l2_regs, kind="stable")[::-1]
  best = order[np.argmax(acc[order])]
  return float(l2_regs[best]), acc
