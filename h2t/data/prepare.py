"""Prepares the TFDS data of VTAB-1k tasks, once, on a machine with internet.

    python -m h2t.data.prepare --tasks=all [--data_dir=DIR] [--manual_dir=DIR]
    python -m h2t.data.prepare --tasks=dtd,clevr_count --check_only

Each task's TFDS builder is downloaded and prepared into the data_dir (TFDS's
default: $TFDS_DATA_DIR or ~/tensorflow_datasets), at the version the VTAB
table pins. Two builders cannot download by themselves (resisc45,
diabetic_retinopathy_detection): for those the command prints which files to
put where, and prepares them once the files are there. `--check_only`
downloads nothing and reports what is ready. The exit status is 0 only when
every requested task is ready.

h2t itself never downloads: `h2t.data.vtab.load` fails on unprepared data
with the command above.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from absl import app, flags

from h2t.data import vtab

# Python modules TFDS imports to build these datasets (the builders' lazy
# imports in TFDS 4.9), and the pip package that provides each.
PACKAGES_NEEDED = {
  "sun397": ("cv2",),
  "diabetic_retinopathy_detection": ("cv2",),
  "kitti": ("cv2",),
  "patch_camelyon": ("h5py",),
  "dsprites": ("h5py",),
  "oxford_flowers102": ("scipy",),
  "svhn_cropped": ("scipy",),
}
# Modules every TFDS build imports: tensorflow-datasets 4.9 imports
# importlib_resources when a builder prepares data, but its package metadata
# requires it only on Python < 3.9 (setup.py installs it for that reason).
MODULES_EVERY_BUILD = ("importlib_resources",)
PIP_NAMES = {
  "cv2": "opencv-python-headless",
  "h5py": "h5py",
  "scipy": "scipy",
  "importlib_resources": "importlib_resources",
}

RESISC45_FILES = """\
resisc45 needs a manual download (TFDS cannot fetch it):
  1. Download NWPU-RESISC45.rar from the dataset's page (TFDS points to
     https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs).
  2. Unpack it (`unrar x NWPU-RESISC45.rar` or `7z x NWPU-RESISC45.rar`) so that
       {manual_dir}/NWPU-RESISC45/airplane/airplane_001.jpg
       ...
       {manual_dir}/NWPU-RESISC45/wetland/wetland_700.jpg
     i.e. 45 class folders of 700 JPEG images each (31,500 images).
  3. Run this command again."""

RETINOPATHY_FILES = """\
diabetic_retinopathy needs a manual download from Kaggle (an account that has
accepted the competition's rules), e.g.
  kaggle competitions download -c diabetic-retinopathy-detection
from https://www.kaggle.com/c/diabetic-retinopathy-detection/data. Unpack into
the manual folder so that it holds:
  {manual_dir}/trainLabels.csv           from trainLabels.csv.zip
  {manual_dir}/train/<id>_left.jpeg ...  35,126 images, from train.zip.001-005 (`7z x train.zip.001`)
  {manual_dir}/test/<id>_left.jpeg ...   53,576 images, from test.zip.001-007 (`7z x test.zip.001`)
  {manual_dir}/sample/<id>_left.jpeg ... 10 images, from sample.zip
TFDS downloads the test labels itself, and its btgraham-300 preprocessing needs
OpenCV (pip install opencv-python-headless). Then run this command again."""

# Builder -> (instructions, paths relative to the manual folder that must exist).
MANUAL_FILES = {
  "resisc45": (RESISC45_FILES, ("NWPU-RESISC45",)),
  "diabetic_retinopathy_detection": (RETINOPATHY_FILES, ("trainLabels.csv", "train", "test", "sample")),
}

_TASKS = flags.DEFINE_string("tasks", "all", "'all' or a comma-separated list of VTAB task names.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's).")
_MANUAL_DIR = flags.DEFINE_string(
  "manual_dir", None, "Folder of manually downloaded files (default: <data_dir>/downloads/manual)."
)
_CHECK_ONLY = flags.DEFINE_bool("check_only", False, "Report what is prepared; download nothing.")


def parse_tasks(spec: str) -> list[str]:
  """'all' or 'a,b' -> task names, in table order; unknown names fail with the list."""
  if spec.strip() == "all":
    return list(vtab.TASKS)
  names = [n.strip() for n in spec.split(",") if n.strip()]
  unknown = [n for n in names if n not in vtab.TASKS]
  if unknown or not names:
    raise ValueError(
      f"--tasks={spec!r}: unknown {unknown}; expected 'all' or names from {', '.join(vtab.TASKS)}"
    )
  return names


def builder_name(spec: vtab.VtabTask) -> str:
  return spec.builder.split("/")[0]


def missing_manual_files(spec: vtab.VtabTask, manual_dir: str) -> list[str]:
  """Paths the builder needs in the manual folder that are not there."""
  if builder_name(spec) not in MANUAL_FILES:
    return []
  _, needed = MANUAL_FILES[builder_name(spec)]
  return [os.path.join(manual_dir, p) for p in needed if not os.path.exists(os.path.join(manual_dir, p))]


def _importable(module: str) -> bool:
  try:
    importlib.import_module(module)
  except Exception:  # noqa: BLE001 -- missing or broken: either way TFDS cannot use it.
    return False
  return True


def missing_packages(spec: vtab.VtabTask) -> list[str]:
  """pip packages TFDS needs to build this dataset that are not installed (or do not import)."""
  modules = MODULES_EVERY_BUILD + PACKAGES_NEEDED.get(builder_name(spec), ())
  return [PIP_NAMES[m] for m in modules if not _importable(m)]


def missing_packages_message(names: Sequence[str]) -> str | None:
  """One sentence with the pip command that installs what preparing `names` needs, or None."""
  by_package: dict[str, list[str]] = {}
  for name in names:
    for package in missing_packages(vtab.TASKS[name]):
      by_package.setdefault(package, []).append(name)
  if not by_package:
    return None
  needs = "; ".join(f"{p} (for {', '.join(tasks)})" for p, tasks in by_package.items())
  return (
    f"preparing these tasks needs Python packages that are not installed: {needs}. "
    f"Install them with: pip install {' '.join(by_package)}"
  )


def unwritable_data_dir(root: str) -> str | None:
  """Why TFDS could not write into `root` (created if missing), or None when it can."""
  try:
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryFile(dir=root):
      pass
  except OSError as e:
    return (
      f"cannot write into the data directory {root!r} ({e.strerror or e}); "
      "pass --data_dir=DIR with a folder you can write, or set TFDS_DATA_DIR"
    )
  return None


def prepare(
  names: Sequence[str],
  *,
  data_dir: str | None,
  manual_dir: str | None,
  download: bool,
  out: Callable[[str], None] = print,
) -> bool:
  """Prepares (or, without `download`, checks) the tasks' TFDS data.

  Returns:
    True when every task's data is prepared.
  """
  root = data_dir or vtab.default_data_dir()
  manual_dir = manual_dir or os.path.join(root, "downloads", "manual")
  # Tasks that share a builder (clevr, dsprites, smallnorb) are prepared once.
  groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
  for name in names:
    spec = vtab.TASKS[name]
    groups.setdefault((spec.builder, spec.versions), []).append(name)

  all_ready = True
  for group in groups.values():
    ready = _prepare_group(
      group, root=root, data_dir=data_dir, manual_dir=manual_dir, download=download, out=out
    )
    all_ready = all_ready and ready
  return all_ready


def _prepare_group(
  group: list[str],
  *,
  root: str,
  data_dir: str | None,
  manual_dir: str,
  download: bool,
  out: Callable[[str], None],
) -> bool:
  """Prepares the builder shared by the tasks in `group`; True when it is ready."""
  import tensorflow_datasets as tfds

  spec = vtab.TASKS[group[0]]
  label = f"{', '.join(group)} ({spec.builder})"
  builder = vtab.find_prepared(spec, data_dir)
  if builder is not None:
    out(f"ready    {label}: {builder.name}:{builder.version} in {builder.data_dir}")
    return True
  candidates = vtab.builder_candidates(spec, data_dir)
  if not candidates:
    out(f"FAILED   {label}: this TFDS ({tfds.__version__}) cannot build any of versions {spec.versions}.")
    return False
  builder = candidates[0]
  missing = missing_manual_files(spec, manual_dir)
  instructions = MANUAL_FILES[builder_name(spec)][0].format(manual_dir=manual_dir) if missing else ""
  if not download:
    out(f"missing  {label}: not prepared in {root}")
    if instructions:
      out(instructions)
    return False
  if missing:
    out(f"manual   {label}: missing {', '.join(missing)}")
    out(instructions)
    return False
  packages = missing_packages(spec)
  if packages:
    out(f"FAILED   {label}: TFDS needs `pip install {' '.join(packages)}` to build it.")
    return False
  out(f"prepare  {label}: {builder.name}:{builder.version} into {root} (large downloads; can take hours) ...")
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except ModuleNotFoundError as e:
    out(
      f"FAILED   {label}: TFDS needs the Python module {e.name!r}: pip install {PIP_NAMES.get(e.name, e.name)}"
    )
    return False
  except Exception as e:  # noqa: BLE001 -- report every failing task, then exit non-zero
    out(f"FAILED   {label}: {type(e).__name__}: {e}")
    return False
  out(f"ready    {label}: {builder.data_dir}")
  return True


def main(argv: Sequence[str]) -> int:
  """Exit status 0 when every task is ready; a user's mistake ends in one `error:` line."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    names = parse_tasks(_TASKS.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  download = not _CHECK_ONLY.value
  if download:
    problem = missing_packages_message(names) or unwritable_data_dir(
      _DATA_DIR.value or vtab.default_data_dir()
    )
    if problem:
      sys.exit(f"error: {problem}")
  ready = prepare(names, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value, download=download)
  if not ready and download:
    sys.exit(
      "error: some tasks are not ready (see the lines above); run the command again once they are fixed"
    )
  return 0 if ready else 1


if __name__ == "__main__":
  app.run(main)
