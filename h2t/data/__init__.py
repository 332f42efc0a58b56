"""Tasks: `get_task(name)` -> `h2t.data.base.Task`: offline sources, image folders and VTAB-1k.

A VTAB-1k task comes from TFDS, or from a prepared VTAB-1k folder (NOAH's
layout, h2t/data/vtab_folder.py) when `data_dir` holds one for it.
"""

from __future__ import annotations

from h2t.data import base, folder, local, shapes, vtab, vtab_folder
from h2t.data.base import Task, balanced_subset_indices, fold_indices

__all__ = ["Task", "balanced_subset_indices", "check_task_name", "fold_indices", "get_task", "task_names"]


class TaskNames(tuple):
  """The known task names; `in` also accepts every `'folder:PATH'` name.

  Listed, the folder family shows as 'folder:PATH', so error messages that
  join the names tell the user about it.
  """

  def __contains__(self, name: object) -> bool:
    return folder.is_folder_name(name) or tuple.__contains__(self, name)


def task_names() -> TaskNames:
  return TaskNames(local.NAMES + shapes.NAMES + (folder.NAME_PATTERN,) + tuple(vtab.TASKS))


def check_task_name(name: str) -> None:
  """Raises ValueError, listing the valid names, if `name` is no known task."""
  if name not in task_names():
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(task_names())}")


def get_task(
  name: str,
  *,
  data_dir: str | None = None,
  fashion_mnist_dir: str | None = None,
  share: base.Share = base.WHOLE,
) -> base.Task:
  """Returns the named task.

  Args:
    name: an offline task ('digits', 'fashion_mnist', the rendered
      'shapes_count' and 'shapes_location'), 'folder:PATH' (a folder
      of class subfolders of images, see h2t/data/folder.py) or a VTAB-1k task.
    data_dir: TFDS data directory (None: TFDS's default). For a VTAB-1k
      task, when `data_dir/<folder>/` holds the lists of a prepared VTAB-1k
      folder (`vtab_folder.FOLDERS`, e.g. 'cifar' for 'cifar100'), the task
      is read from them instead of TFDS.
    fashion_mnist_dir: folder of Fashion-MNIST IDX files, the offline source.
    share: this process's share (several processes): a prepared VTAB-1k
      folder's check of its lists reads only this share's files.
  """
  if name == "digits":
    return local.load_digits()
  if name == "fashion_mnist":
    return local.load_fashion_mnist(data_dir=data_dir, idx_dir=fashion_mnist_dir)
  if name in shapes.NAMES:
    return shapes.load(name)
  if folder.is_folder_name(name):
    return folder.load(name)
  if name in vtab.TASKS:
    if vtab_folder.has_lists(name, data_dir):
      return vtab_folder.load(name, data_dir, share)
    try:
      return vtab.load(name, data_dir=data_dir)
    except vtab.NotPreparedError as e:
      where = vtab_folder.hint(name, data_dir or vtab.default_data_dir())
      raise vtab.NotPreparedError(f"{e} {where}") from None
  check_task_name(name)
  raise AssertionError(name)  # unreachable: check_task_name raised
