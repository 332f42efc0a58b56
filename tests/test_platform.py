"""Machine settings: the persistent compilation cache serves a second process."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one small program with the cache in `folder`; prints what the cache did.
SCRIPT = textwrap.dedent(
  """
  import json, sys
  sys.path.insert(0, {root!r})
  import jax, jax.numpy as jnp
  from h2t import platform
  folder = platform.enable_compilation_cache({folder!r})
  with platform.CompileMonitor() as compiled:
    jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
  print(json.dumps(dict(folder=folder, hits=compiled.cache_hits, misses=compiled.cache_misses,
                        programs=compiled.backend_compiles)))
  """
)


def _run(folder: str) -> dict:
  code = SCRIPT.format(root=ROOT, folder=folder)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


class CompilationCacheTest(absltest.TestCase):
  def test_second_process_reads_the_programs_of_the_first(self):
    with tempfile.TemporaryDirectory() as tmp:
      folder = os.path.join(tmp, "jax_cache")  # created by enable_compilation_cache
      first = _run(folder)
      written = os.listdir(folder)
      second = _run(folder)
      self.assertEqual(first["folder"], folder)
      self.assertGreaterEqual(first["programs"], 1)
      # Even this sub-second CPU program is cached (JAX's default threshold is 1 s).
      self.assertEqual((first["hits"], first["misses"]), (0, first["programs"]))
      self.assertNotEqual(written, [])
      self.assertEqual((second["hits"], second["misses"]), (first["programs"], 0))
      self.assertEqual(sorted(os.listdir(folder)), sorted(written))

  def test_bad_thresholds(self):
    from h2t import platform

    with self.assertRaisesRegex(ValueError, "min_compile_time_secs=-1"):
      platform.enable_compilation_cache("/tmp/unused", min_compile_time_secs=-1)
    self.assertEqual(platform.enable_compilation_cache(""), "")


if __name__ == "__main__":
  absltest.main()
