"""experiments/colab_vtab.ipynb runs top to bottom on a CPU with its TINY configuration."""

import json
import os
import shutil
import tempfile
from unittest import mock

import nbformat
from absl.testing import absltest
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_vtab.ipynb")


def read_notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


class NotebookTest(absltest.TestCase):
  def test_install_cell_is_valid_ipython_and_guarded(self):
    nb = read_notebook()
    install = next(c for c in nb.cells if c.cell_type == "code" and "%pip install" in c.source)
    code = TransformerManager().transform_cell(install.source)
    compile(code, "install_cell", "exec")  # magics inside the except block are valid
    self.assertIn("except ImportError:", install.source)
    self.assertIn("run_line_magic('pip'", code)

  def test_runs_with_the_tiny_configuration(self):
    nb = read_notebook()
    workdir = tempfile.mkdtemp(prefix="h2t_notebook_")
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    # Papermill's convention: a cell after the one tagged 'parameters' overrides them.
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(f"TINY = True\nWORKDIR = {workdir!r}"))
    # The kernel inherits the environment: h2t importable from this checkout, no accelerator sought.
    env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    with mock.patch.dict(os.environ, env):
      NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": workdir}}
      ).execute()

    texts, images = [], 0
    for cell in nb.cells:
      for out in cell.get("outputs", []):
        texts.append(out.get("text", "") + json.dumps(out.get("data", {}).get("text/markdown", "")))
        images += "image/png" in out.get("data", {})
    text = "\n".join(texts)
    self.assertNotIn("git clone", text)  # h2t was importable: nothing installed
    self.assertIn("default backend: cpu", text)
    self.assertRegex(text, r"head2toe\s+test accuracy")
    self.assertIn("| Head2Toe | efficientnet_lite0 |", text)
    self.assertIn("backbone parameters", text)
    self.assertGreaterEqual(images, 1)  # at least the kept-features figure
    results_path = os.path.join(workdir, "efficientnet_lite0", "digits", "results.json")
    with open(results_path) as f:
      results = json.load(f)
    self.assertEqual(results["backbone"]["input_size"], 32)
    self.assertEqual(results["config"]["learning"]["training_steps"], 30)


if __name__ == "__main__":
  absltest.main()
