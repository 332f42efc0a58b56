"""Bytes moved per training step of the grid's programs, against the work's minimum.

    PYTHONPATH=. python experiments/bench_grid_bytes.py [--dims=81536,1306472,2612944] [--heads1=4] [--heads2=16]

XLA's cost analysis of the compiled stage-1 and stage-2 programs gives the
bytes each touches. It counts a while loop's body once, whatever the trip
count, so one step is the difference between the same 4-step program with the
training loop's body unrolled twice (2 trips of 2 steps) and not unrolled
(4 trips of 1 step): the prologue (initialisation, minibatch indices, stage 2's
kept-feature array) is the same in both and cancels. (Until 2026-11-29 the
figure was cost(2 steps) - cost(1 step); XLA removes a 1-trip loop, so that
difference was the loop's body minus a step inlined into the prologue, not a
step: stage 2's "5.01x" was mostly its `[H, m, K]` precomputation.) Nothing is
run, so paper-sized programs (D up to ~2.6M features) can be measured on a
laptop CPU. The minimum of a step:

* stage 1 (H heads on all D features, shared minibatch of B): gather the
  minibatch once (read + write B*D), read it for the forward and the backward
  matmul, and read + write each head's kernel and its two Adam moments
  (6*D*C per head);
* stage 2 (H heads, each on its own K kept features): read each head's
  minibatch rows of its kept features (H*B*K) for the forward and the
  backward pass, and read + write each head's kernel and moments (6*K*C).

Float32 features unless `--feature_dtype=bfloat16`. The ratio measured / minimum is what the issue bounds
(<= 2x on the paper grid).

XLA's model charges a gather fused into a loop fusion its whole operand: the
minibatch gather of a step is charged all n rows of `x [n, D]` (stage 1) or
all m rows of each head's `[m, K]` (stage 2), not the B rows it reads. The
last column charges the gather its B rows instead (measured minus the rows it
does not read); replacing the gather by a `dynamic_slice` of B rows (which XLA
charges its rows) gives the same figure to 0.001 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import jax
import jax.numpy as jnp

from h2t import probe, stages

F32 = 4
# The paper grid's penalties: stage 1 has the group penalty only (its l2,1
# coefficients 1e-3 / 1e-5), stage 2 none (the base learning config's are 0).
# `--all_penalties` measures programs that compute every penalty, as before.
PENALIZED_1, PENALIZED_2 = (False, False, True), (False, False, False)
# learning.feature_dtype: what the steps' minibatches are gathered from (`--feature_dtype`).
FEATURE_DTYPE = "float32"


@contextlib.contextmanager
def scan_unrolled(unroll: int):
  """`jax.lax.scan` (the trainer's step loop; jax.random's loops do not use it) unrolled `unroll` times."""
  scan = jax.lax.scan
  jax.lax.scan = functools.partial(scan, unroll=unroll)
  try:
    yield
  finally:
    jax.lax.scan = scan


def step_bytes(fn, args, steps: int = 4) -> float:
  """Bytes of one step: cost(loop body of 2 steps) - cost(loop body of 1 step), same program otherwise."""
  costs = []
  for unroll in (1, 2):
    jax.clear_caches()  # the stages' jitted functions would reuse the other unrolling's trace
    with scan_unrolled(unroll):
      cost = jax.jit(lambda *a: fn(steps, *a)).lower(*args).compile().cost_analysis()
    cost = cost if isinstance(cost, dict) else cost[0]
    costs.append(float(cost["bytes accessed"]))
  return costs[1] - costs[0]


def train_spec(classes: int, steps: int, batch: int, penalized: tuple[bool, bool, bool]) -> probe.TrainSpec:
  return probe.TrainSpec(
    num_classes=classes,
    training_steps=steps,
    batch_size=batch,
    penalized=penalized,
    feature_dtype=FEATURE_DTYPE,
  )


def hparams(heads: int) -> probe.HParams:
  """`[heads]` hyperparameter shapes."""
  return probe.HParams(*[jax.ShapeDtypeStruct((heads,), jnp.float32)] * 4)


def stage1(dim: int, heads: int, classes: int, n: int, m: int, batch: int) -> tuple[float, float, float]:
  def fn(steps, x, y, tr, hp, key):
    spec = train_spec(classes, steps, batch, PENALIZED_1)
    return stages.train_all_features(x, y, tr, hp, key, spec=spec)

  args = (
    jax.ShapeDtypeStruct((n, dim), FEATURE_DTYPE),  # stage 1 receives its input in the storage dtype
    jax.ShapeDtypeStruct((n,), jnp.int32),
    jax.ShapeDtypeStruct((m,), jnp.int32),
    hparams(heads),
    jax.random.key(0),
  )
  e = jnp.dtype(FEATURE_DTYPE).itemsize
  minimum = e * (2 * batch * dim + 2 * batch * dim) + F32 * 6 * heads * dim * classes
  unread = e * (n - batch) * dim  # rows of x the minibatch gather is charged but does not read
  return step_bytes(fn, args), minimum, unread


def stage2(
  dim: int, kept: int, heads: int, classes: int, n: int, m: int, batch: int
) -> tuple[float, float, float]:
  def fn(steps, x, y, tap_of, hp, tr, idx, mask, key):
    spec = train_spec(classes, steps, batch, PENALIZED_2)
    return stages.train_kept_features(
      x, y, tap_of, hp, (tr, idx, mask, key), spec=spec, num_taps=50, mode="unit_vector"
    )

  args = (
    jax.ShapeDtypeStruct((n, dim), jnp.float32),
    jax.ShapeDtypeStruct((n,), jnp.int32),
    jax.ShapeDtypeStruct((dim,), jnp.int32),
    hparams(heads),
    jax.ShapeDtypeStruct((m,), jnp.int32),
    jax.ShapeDtypeStruct((heads, kept), jnp.int32),
    jax.ShapeDtypeStruct((heads, kept), jnp.float32),
    jax.random.key(0),
  )
  e = jnp.dtype(FEATURE_DTYPE).itemsize
  minimum = e * 2 * heads * batch * kept + F32 * 6 * heads * kept * classes
  unread = e * heads * (m - batch) * kept
  return step_bytes(fn, args), minimum, unread


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  # ResNet-50's feature counts at the paper's target sizes 1024 / 16384 / 40000.
  parser.add_argument("--dims", default="81536,1306472,2612944")
  parser.add_argument("--heads1", type=int, default=4, help="distinct stage-1 settings per program")
  parser.add_argument("--heads2", type=int, default=16, help="grid points per stage-2 program")
  parser.add_argument("--keep", type=float, default=0.2, help="largest keep fraction (stage-2 width)")
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--all_penalties", action="store_true")
  parser.add_argument("--feature_dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args()
  global FEATURE_DTYPE
  FEATURE_DTYPE = args.feature_dtype
  if args.all_penalties:
    global PENALIZED_1, PENALIZED_2
    PENALIZED_1 = PENALIZED_2 = (True, True, True)
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}; batch 128, 1000 examples, 800 per fold; "
    f"features stored in {FEATURE_DTYPE}"
  )
  print("| program | D | heads | K | bytes/step measured | minimum | ratio | ratio, gather at its B rows |")
  print("|---|---|---|---|---|---|---|---|")
  for dim in (int(d) for d in args.dims.split(",")):
    kept = int(dim * args.keep)
    rows = [
      ("stage 1", args.heads1, "-", stage1(dim, args.heads1, args.classes, 1000, 800, 128)),
      ("stage 2", args.heads2, kept, stage2(dim, kept, args.heads2, args.classes, 1000, 800, 128)),
    ]
    for name, heads, k, (got, low, unread) in rows:
      print(
        f"| {name} | {dim} | {heads} | {k} | {got / 1e9:.3f} GB | {low / 1e9:.3f} GB | {got / low:.2f}x "
        f"| {(got - unread) / low:.2f}x |"
      )


if __name__ == "__main__":
  main()
