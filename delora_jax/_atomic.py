"""Putting a finished checkpoint folder in place atomically, without ever deleting the old one first.

A save writes into a staging folder of its own beside the target (``.<name>.delora-staging-
<host>-<random>/checkpoint``; a name over 64 bytes is shortened there to its first 16 characters
and a hash, so that the staging name stays under NAME_MAX), so concurrent saves never share a
temporary folder. When the checkpoint in it is complete it takes the target's name in one step:

- no target yet: ``rename(staging, target)``, which fails if the target appeared meanwhile
  (another save finished first): this save then raises and leaves that one alone;
- an existing checkpoint (``overwrite=True``): ``renameat2(RENAME_EXCHANGE)`` swaps the two
  folders in one step (Linux), so the name always holds a complete checkpoint, old or new;
  the old one is deleted only after the swap. Where the exchange is not available, the old
  folder is first renamed aside (never deleted), so a crash between the two renames leaves
  it on disk under ``.<name>.delora-old-...``.

The writer holds an ``flock`` on the staging folder's ``lock`` file for as long as it runs (the
kernel releases it when the process dies, however it dies). A later save deletes a staging folder
only if it can take that lock itself, so a live writer's folder is never deleted, whichever PID
namespace (container) it runs in. Only folders written from this host name are judged: on a
network filesystem a lock may be local to one machine.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import uuid

STAGING, OLD, CHECKPOINT, LOCK = ".delora-staging-", ".delora-old-", "checkpoint", "lock"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _short(name: str) -> str:
  """``name``, or for a name over 64 bytes its first 16 characters and a hash of it."""
  if len(os.fsencode(name)) <= 64:
    return name
  return f"{name[:16]}~{hashlib.blake2b(os.fsencode(name), digest_size=8).hexdigest()}"


def staging_path(path: str, token: str) -> str:
  """The staging folder of ``path`` for the save ``token`` (``<host>-<random>``)."""
  parent, name = os.path.split(path)
  return os.path.join(parent, f".{_short(name)}{STAGING}{token}")


def create_staging(path: str) -> tuple[str, int]:
  """Creates a staging folder for ``path`` with its lock held; returns its token and the lock's
  file descriptor (keep it open until the folder is gone: :func:`discard`).

  The lock file is created exclusively and the lock taken before anything is written, and a
  sweep (:func:`remove_stale`) that took the lock of the new, still empty, folder first wins:
  this then tries another name. On a filesystem without ``flock`` the folder is unlocked, and
  sweeps there cannot lock it either, so they leave it alone.
  """
  for _ in range(8):
    token = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
    folder = staging_path(path, token)
    os.mkdir(folder)
    lock = os.path.join(folder, LOCK)
    try:
      fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except (FileExistsError, FileNotFoundError):  # a sweep created the lock, or already deleted the folder
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # not deleted by a sweep before we locked
        return token, fd
    except (BlockingIOError, FileNotFoundError):  # a sweep holds it, or has deleted the folder
      pass
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        os.close(fd)
        raise
      return token, fd  # no locks on this filesystem
    os.close(fd)
  raise OSError(errno.EAGAIN, "no staging folder could be locked (the folder is being swept)", path)


def discard(folder: str, fd: int | None) -> None:
  """Deletes a staging folder (holding the old checkpoint after an exchange), then lets its lock go."""
  shutil.rmtree(folder, ignore_errors=True)
  if fd is not None:
    os.close(fd)


def remove_stale(path: str) -> None:
  """Deletes the staging folders of ``path`` left by saves from this host that are gone: those
  whose lock this process can take."""
  parent, name = os.path.split(path)
  prefix = f".{_short(name)}{STAGING}"
  try:
    entries = os.listdir(parent)
  except OSError:
    return
  host = socket.gethostname()
  for entry in entries:
    if not entry.startswith(prefix) or entry[len(prefix) :].rpartition("-")[0] != host:
      continue
    lock = os.path.join(parent, entry, LOCK)
    try:
      fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:  # gone meanwhile, not a folder, or not ours to write
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      if os.lstat(lock).st_ino == os.fstat(fd).st_ino:
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)  # the lock held until it is gone
    except OSError:  # a live writer holds it, or this filesystem has no locks: leave it
      pass
    finally:
      os.close(fd)


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
  """Gives the complete checkpoint in the staging folder ``staging`` the name ``path`` (see the
  module docstring); after an exchange the staging folder holds the old one (:func:`discard`).

  Raises ``FileExistsError`` if ``path`` appeared while ``overwrite`` is False; ``path`` is then
  left as it is.
  """
  new = os.path.join(staging, CHECKPOINT)
  try:
    os.rename(new, path)  # atomic; refuses a non-empty folder or a file already there
    return
  except OSError as e:
    if not os.path.lexists(path):
      raise
    if not overwrite:
      raise FileExistsError(errno.EEXIST, "created by another save while this one ran", path) from e
  if _exchange(new, path):
    return
  _commit_by_moving_aside(new, path, staging.replace(STAGING, OLD))


def _commit_by_moving_aside(new: str, path: str, aside: str) -> None:
  """Without an exchange: moves what is at ``path`` aside, then renames ``new`` to ``path``.

  Another save may do the same at once: it may move the old checkpoint aside first, or put its
  own in place between our two renames. Then what is there now is moved aside too and we try
  again (the last writer wins). What was moved aside is deleted only once ours is in place; if
  ours cannot be put in place, the newest folder moved aside goes back where it was.
  """
  moved: list[str] = []
  try:
    for attempt in range(64):
      try:
        os.rename(path, f"{aside}-{attempt}")
        moved.append(f"{aside}-{attempt}")
      except FileNotFoundError:  # another save moved it aside first
        pass
      try:
        os.rename(new, path)
        break
      except OSError:
        if not os.path.lexists(path):
          raise
    else:
      raise OSError(errno.EAGAIN, "other saves kept replacing the checkpoint; gave up after 64 tries", path)
  except OSError:
    if moved and not os.path.lexists(path):
      try:
        os.rename(moved.pop(), path)
      except OSError:
        pass
    raise
  for folder in moved:
    shutil.rmtree(folder, ignore_errors=True)
