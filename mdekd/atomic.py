"""Atomic file writes: a reader never sees a half-written file, an interrupted writer leaves none.

Every writer in mdekd goes through ``atomic_path``: the content is written to a hidden temporary
file in the destination's folder (same file system, so the final rename is atomic) and renamed over
the destination only once it is complete; on any error the temporary file is removed.
"""

import contextlib
import os
import pathlib


@contextlib.contextmanager
def atomic_path(path):
    """Context manager yielding a temporary path to write; on success it replaces ``path``.

    The temporary name keeps ``path``'s suffixes (``.keras``, ``.png``, ...) so that writers which
    choose a format by extension behave the same.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomically(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        pathlib.Path(tmp).write_text(text)


def write_bytes_atomically(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        pathlib.Path(tmp).write_bytes(data)


def replace_directory(source, destination):
    """Move the finished folder ``source`` to ``destination``, replacing any old one: readers see
    the old or the new folder, never a mix (the old one is moved aside first, then deleted)."""
    import shutil

    source, destination = pathlib.Path(source), pathlib.Path(destination)
    if destination.exists():
        stale = destination.with_name(f"{destination.name}.old{os.getpid()}")
        os.replace(destination, stale)
        os.replace(source, destination)
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    else:
        os.replace(source, destination)
