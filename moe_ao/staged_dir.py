"""Directories that appear whole or not at all, and never replace what moe_ao did not write.

A checkpoint (or an export) is written into a *staging* directory beside its target,
``.<name>.moe_ao-staging-<host>-<pid>-<random>``, and moved into place by one rename
when complete:

- a new target: ``rename(staging, target)``, atomic;
- an existing target (only an empty directory, or one whose every file its owner lists
  as moe_ao's own, see ``owned_files``): the two directories are exchanged in one step
  (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant the target path holds
  either the complete old or the complete new tree; the old tree, now under the
  staging name, is then deleted.

A process killed at any point leaves at most a staging directory. Its name says that
moe_ao made it and which process did; the next save to the same target deletes those of
processes that are gone (on this host) and logs each, and reports any it cannot judge.
Nothing else is ever deleted. Without ``renameat2`` (other kernels, some network file
systems) the replace falls back to two renames, with a window in which the target is
missing: a warning says so.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

STAGING_TAG = "moe_ao-staging"
RESUME_TAG = "moe_ao-resume"  # staging of a resumable job (moe_ao.stream): kept across processes
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Folders that earlier moe_ao versions (checkpoint format 1) left behind when killed.
_LEGACY = re.compile(r"\.(?P<name>.+)\.(?:tmp-[A-Za-z0-9_]+|old-\d+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _staging_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.{STAGING_TAG}-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def clean_stale(target: Path) -> list[Path]:
    """Deletes staging directories of ``target`` left by dead processes of this host.

    Returns:
        The directories deleted. Staging directories of live processes or other hosts,
        and format-1 leftovers, are only reported (logged), never deleted.
    """
    removed = []
    if not target.parent.is_dir():
        return removed
    pattern = _staging_re(target.name)
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            if m["host"] == _host() and not _pid_alive(int(m["pid"])):
                size = _size_mb(entry)
                shutil.rmtree(entry, ignore_errors=True)
                logger.warning("removed %s (%.1f MB): an interrupted moe_ao save to %s", entry, size, target)
                removed.append(entry)
            else:
                logger.warning("left %s alone: a moe_ao save to %s by a live process or another host", entry, target)
            continue
        legacy = _LEGACY.match(entry.name)
        if legacy and legacy["name"] == target.name and entry.is_dir():
            logger.warning("%s (%.1f MB) looks like an interrupted save of an older moe_ao; delete it by hand if "
                           "you do not need it", entry, _size_mb(entry))
    return removed


def check_target(target: Path, overwrite: bool, owned_files: Callable[[Path], set[str] | None]) -> None:
    """Refuses, before anything is written, a target this save must not replace.

    Args:
        target: the final directory.
        overwrite: whether an existing moe_ao directory may be replaced.
        owned_files: target -> the relative paths moe_ao wrote there (its manifest), or
            None when the directory is not moe_ao's.

    Raises:
        ValueError: the target is a file; or a non-empty directory without
            ``overwrite``; or one holding anything moe_ao did not write (named).
    """
    if not target.exists():
        if target.is_symlink():
            raise ValueError(f"{target} is a dangling symbolic link; refusing to write through it")
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; refusing to replace it")
    present = sorted(str(p.relative_to(target)) for p in target.rglob("*") if not p.is_dir() or not any(p.iterdir()))
    if not present:
        return  # an empty directory, e.g. from tempfile.TemporaryDirectory(): use it
    if not overwrite:
        raise ValueError(f"{target} exists and is not empty; pass overwrite=True to replace a moe_ao checkpoint there")
    owned = owned_files(target)
    if owned is None:
        raise ValueError(f"{target} is not a moe_ao directory (no manifest); refusing to replace it even with "
                         f"overwrite=True: move its contents away or choose another directory")
    foreign = [p for p in present if p not in owned]
    if foreign:
        raise ValueError(f"{target} holds {foreign[:3]}{' ...' if len(foreign) > 3 else ''}, which moe_ao did not "
                         f"write; refusing to replace it: move those away or choose another directory")


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two directories atomically; False where the system cannot (caller falls back)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: Path) -> None:
    """Flushes a directory's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class StagedDir:
    """A directory written in staging and moved onto ``target`` whole (see the module doc).

    Use as a context manager: leaving the block with an exception deletes the staging
    directory; :meth:`commit` moves it into place::

        with StagedDir(out, overwrite, owned_files) as stage:
            (stage.path / "a.json").write_text("{}")
            stage.commit()

    Args:
        target: the final directory (symbolic links are resolved: the real directory is
            replaced).
        overwrite: allow replacing an existing moe_ao directory.
        owned_files: see :func:`check_target`.

    Raises:
        ValueError: from :func:`check_target`, before anything is written.
    """

    def __init__(self, target: str | os.PathLike, overwrite: bool,
                 owned_files: Callable[[Path], set[str] | None], path: Path | None = None) -> None:
        self.target = Path(target).expanduser().resolve()
        self.overwrite, self.owned_files = overwrite, owned_files
        check_target(self.target, overwrite, owned_files)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.target)
        if path is None:
            prefix = f".{self.target.name}.{STAGING_TAG}-{_host()}-{os.getpid()}-"
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.target.parent))
            os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes it 0700; a checkpoint is an ordinary folder
        self.path = path
        self.committed = False

    @classmethod
    def resumable(cls, target: str | os.PathLike, key: str, overwrite: bool,
                  owned_files: Callable[[Path], set[str] | None]) -> StagedDir:
        """A staging directory named by ``key`` (``.<name>.moe_ao-resume-<key>``) that outlives the process.

        A long job restarted with the same key finds what it wrote before. Stale-staging
        cleanup never touches it; a discarded or committed one is gone. Use it without
        the context manager (an exception must not delete a resumable job's work).
        """
        t = Path(target).expanduser().resolve()
        path = t.parent / f".{t.name}.{RESUME_TAG}-{key}"
        check_target(t, overwrite, owned_files)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o777 & ~_umask())
        return cls(target, overwrite, owned_files, path=path)

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.discard()

    def files(self) -> list[str]:
        """Relative paths of every file written so far."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())

    def discard(self) -> None:
        """Deletes the staging directory (nothing at the target changes)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        """Moves the staging directory onto the target; returns the target."""
        assert not self.committed, f"{self.path=} committed twice"
        for p in self.path.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(self.path)
        check_target(self.target, self.overwrite, self.owned_files)  # it may have changed meanwhile
        if not self.target.exists():
            os.rename(self.path, self.target)
            self.committed = True
        elif _exchange(self.path, self.target):
            self.committed = True
            if not any(self.path.iterdir()):  # the user's empty directory: keep its permissions
                shutil.copymode(self.path, self.target)
            shutil.rmtree(self.path, ignore_errors=True)  # the old tree, now under the staging name
        else:
            logger.warning("%s: this file system cannot exchange directories atomically; replacing it in two "
                           "steps (a kill in between leaves the old tree under %s)", self.target, self.path)
            old = self.path.with_name(self.path.name + "old")  # still a staging name: cleaned if left behind
            os.rename(self.target, old)
            os.rename(self.path, self.target)
            self.committed = True
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(self.target.parent)
        return self.target
