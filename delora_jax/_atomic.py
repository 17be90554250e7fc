"""Putting a finished checkpoint folder in place atomically, without ever deleting the old one first.

A save writes into a staging folder of its own beside the target (``.<name>.delora-staging-
<host>-<pid>-<random>``), so concurrent saves never share a temporary folder. When the
staging folder is complete it takes the target's name in one step:

- no target yet: ``rename(staging, target)``, which fails if the target appeared meanwhile
  (another save finished first): this save then raises and leaves that one alone;
- an existing checkpoint (``overwrite=True``): ``renameat2(RENAME_EXCHANGE)`` swaps the two
  folders in one step (Linux), so the name always holds a complete checkpoint, old or new;
  the old one is deleted only after the swap. Where the exchange is not available, the old
  folder is first renamed aside (never deleted), so a crash between the two renames leaves
  it on disk under ``.<name>.delora-old-...``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import uuid

STAGING, OLD = ".delora-staging-", ".delora-old-"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def staging_token() -> str:
  """``<host>-<pid>-<random>``: unique to this save, and tells whether its writer still runs."""
  return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def staging_path(path: str, token: str) -> str:
  parent, name = os.path.split(path)
  return os.path.join(parent, f".{name}{STAGING}{token}")


def _writer_alive(token: str) -> bool:
  host, _, rest = token.rpartition("-")[0].rpartition("-")
  try:
    pid = int(rest)
  except ValueError:
    return True  # not a name this module wrote: leave it
  if host != socket.gethostname():
    return True  # another machine's save: not ours to judge
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale(path: str) -> None:
  """Deletes staging folders of ``path`` left by saves on this host whose process is gone."""
  parent, name = os.path.split(path)
  prefix = f".{name}{STAGING}"
  try:
    entries = os.listdir(parent)
  except OSError:
    return
  for entry in entries:
    if entry.startswith(prefix):
      token = entry[len(prefix) :].split(".orbax-checkpoint-tmp")[0]
      if not _writer_alive(token):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths in one step; False where the system cannot."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
    return False
  raise OSError(err, os.strerror(err), a, None, b)


def commit(staging: str, path: str, *, overwrite: bool) -> None:
  """Gives the complete folder ``staging`` the name ``path`` (see the module docstring).

  Raises ``FileExistsError`` if ``path`` appeared while ``overwrite`` is False; ``staging`` is
  then deleted and ``path`` left as it is.
  """
  try:
    os.rename(staging, path)  # atomic; refuses a non-empty folder or a file already there
    return
  except OSError as e:
    if not os.path.lexists(path):
      raise
    if not overwrite:
      shutil.rmtree(staging, ignore_errors=True)
      raise FileExistsError(errno.EEXIST, "created by another save while this one ran", path) from e
  if _exchange(staging, path):
    shutil.rmtree(staging, ignore_errors=True)  # now the old checkpoint
    return
  aside = staging.replace(STAGING, OLD)
  os.rename(path, aside)
  try:
    os.rename(staging, path)
  except OSError:
    os.rename(aside, path)
    raise
  shutil.rmtree(aside, ignore_errors=True)
