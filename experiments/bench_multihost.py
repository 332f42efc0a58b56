r"""A run over two processes on this machine against the same run in one: wall time, images decoded, heads trained.

The task is scikit-learn's digits written as PNG files (1000 training, 797
test images in a `train/` + `test/` folder), so every image is decoded from a
file; each process runs through `tests/read_counter.py`, which lists the files
it decodes and the heads it trains (CV heads: one per distinct grid point and
fold; final fits: one per method). The one-process run goes first, then the two processes
(`--multihost`, 127.0.0.1, gloo on the CPU), with the test suite's settings
(32 px, target size 64, 20 steps, keep fraction 0.05 / 0.1).

  JAX_PLATFORMS=cpu python experiments/bench_multihost.py --out=experiments/results/multihost_cpu.txt
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from bench_common import REPO, Printer  # experiments/ is on sys.path

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "Also write the printed lines to this file.")
flags.DEFINE_integer("steps", 20, "Training steps of every probe.")


def main(argv):
  del argv
  sys.path.insert(0, REPO)
  from tests import test_multihost, toy

  out = Printer()
  tmp = tempfile.mkdtemp(prefix="h2t_bench_multihost_")
  test_multihost.write_digits_folder(os.path.join(tmp, "digits"))
  fast = (
    *toy.fast(steps=FLAGS.steps),
    "--config.sweep=learning.feature_selection.keep_fraction=0.05,0.1",
    f"--config.dataset=folder:{os.path.join(tmp, 'digits')}",
  )
  env = toy.environ({"JAX_PLATFORMS": "cpu"})

  def launch(workdir, reads, *extra):
    cmd = test_multihost.counted(toy.main_command(workdir, *extra, fast=fast), reads)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)

  out(f"# {' '.join(sys.argv)}")
  out(f"# h2t.main on digits as 1797 PNG files (folder task), {' '.join(fast[:-1])}; JAX_PLATFORMS=cpu")
  out(f"# one process, then two (--multihost, 127.0.0.1) on the same machine; load average {os.getloadavg()}")
  runs = {}
  start = time.perf_counter()
  single = launch(os.path.join(tmp, "single"), os.path.join(tmp, "reads_single.json"))
  runs["one process"] = [(single, single.communicate(), "reads_single.json")]
  out(f"one process: wall {time.perf_counter() - start:.1f} s")
  port = test_multihost.free_port()
  start = time.perf_counter()
  procs = []
  for i in range(2):
    flags_i = (
      "--multihost",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    )
    procs.append(launch(os.path.join(tmp, f"two_{i}"), os.path.join(tmp, f"reads_p{i}.json"), *flags_i))
  runs["two processes"] = [(p, p.communicate(), f"reads_p{i}.json") for i, p in enumerate(procs)]
  out(f"two processes: wall {time.perf_counter() - start:.1f} s")
  decoded, heads = {}, {}
  for name, members in runs.items():
    for i, (proc, (stdout, stderr), reads) in enumerate(members):
      who = name if len(members) == 1 else f"{name}, process {i}"
      if proc.returncode != 0:
        out(f"{who}: FAILED (exit {proc.returncode}): {stderr.strip().splitlines()[-1:]}")
        continue
      counts = test_multihost.decoded(os.path.join(tmp, reads))
      decoded[who] = counts
      heads[who] = test_multihost.trained(os.path.join(tmp, reads))
      fits = test_multihost.trained(os.path.join(tmp, reads), cv=False)
      by_size = collections.Counter()
      for (_, size), n in counts.items():
        by_size[size] += n
      files = len({path for path, _ in counts})
      sizes = ", ".join(f"{n} at {s} px" for s, n in sorted(by_size.items(), reverse=True))
      out(f"{who}: decoded {sum(counts.values())} times ({sizes}), {files} distinct files")
      out(f"{who}: trained {sum(heads[who].values())} CV heads and {sum(fits.values())} final fit(s)")
      for line in stdout.splitlines():
        if "accuracy" in line or line.strip().startswith(("time:", "cv:")):
          out(f"{who}: {line.strip()}")
  if len(decoded) == 3:
    one, p0, p1 = decoded.values()
    shared = {p for p, _ in p0} & {p for p, _ in p1}
    out(
      f"files decoded by both processes: {len(shared)}; process 0 + process 1 == one process: {p0 + p1 == one}"
    )
    one, p0, p1 = heads.values()
    out(
      f"CV heads trained by both processes: {len(set(p0) & set(p1))}; "
      f"process 0 + process 1 == one process: {p0 + p1 == one}"
    )
  if FLAGS.out:
    out.write(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
