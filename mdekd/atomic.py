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


def prepare_directory(path, flag):
    """Create the folder ``path`` (and parents) and prove it writable, before any long work.

    PermissionError naming ``flag`` and the path when it exists as a file, cannot be created or
    is not writable, so every CLI reports an unusable output in one line.
    """
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".{os.getpid()}.probe"
        probe.touch()
        probe.unlink()
    except OSError as error:
        blocking = next((p for p in (path, *path.parents) if p.is_file()), None)
        reason = error.strerror if blocking is None else f"'{blocking}' is a file"
        raise PermissionError(f"{flag}: cannot write to '{path}': {reason}") from error
    return path


def prepare_file(path, flag):
    """``prepare_directory`` for the folder of the file ``path``; also refuses a ``path`` that is
    an existing folder. Returns ``path``."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise PermissionError(f"{flag}: cannot write the file '{path}': it is a folder")
    prepare_directory(path.parent if str(path.parent) else ".", flag)
    return path
