"""The watch folder as found on disk: walks, file signatures, and the images a rescan finds
that the database has not recorded (the settler's rescans)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from monitor.records import storable


def inside(path: str | Path, root: Path) -> bool:
    """Whether path, with every symlink resolved, lies in the watch folder root."""
    real = Path(os.path.realpath(path))
    return real.is_relative_to(os.path.realpath(root))


def special(path: Path, root: Path) -> bool:
    """A name that does not hold layer content of its own: a pipe, socket or device, or a
    symlink out of the watch folder. It gets one error record, never a re-read."""
    try:
        st = path.stat()
    except OSError:
        return path.is_symlink()  # dangling or a loop: judged by the link itself
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return True
    return path.is_symlink() and not inside(path, root)


def signature(path: Path, root: Path | None = None) -> tuple[int, int] | None:
    """(size, mtime_ns) of the content; of the link itself for a symlink leading out of
    root (its target is never read, and /proc files change under every look)."""
    try:
        st = path.stat()
        if root is not None and path.is_symlink() and not inside(path, root):
            st = path.lstat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def walk(top: Path, root: Path, *, recursive: bool) -> Iterator[Path]:
    """Files under `top`, hidden folders skipped; only `root` itself unless `recursive`."""
    # followlinks=False: a symlink loop must not hang the scan.
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if not recursive and Path(dirpath) != root:
            dirnames[:] = []
            continue
        for name in filenames:
            yield Path(dirpath) / name


def unrecorded(
    root: Path, *, recursive: bool, known: Mapping[str, tuple[int | None, int | None]]
) -> Iterator[tuple[Path, tuple[int, int]]]:
    """Files under `root` whose content `known` (stored path -> signature) has not recorded,
    with their signature."""
    for path in walk(root, root, recursive=recursive):
        sig = signature(path, root)
        if sig is None:
            continue
        stored = known.get(storable(str(path)))
        if stored is not None and (stored == sig or special(path, root)):
            continue  # recorded; a pipe, device or link out has no content to re-read
        yield path, sig
