"""Writes that leave either the complete result or nothing: build beside, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def new_file(path, suffix: str = "", prefix: str = ".tmp-") -> Iterator[str]:
    """Yield a temporary path in ``path``'s directory to write; when the block ends normally it
    replaces ``path`` (mode 644), on any error it is removed."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(os.fspath(path)) or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def new_directory(target, prefix: str = ".saving-") -> Iterator[str]:
    """Yield a temporary directory beside ``target`` to fill; when the block ends normally it
    becomes ``target`` (an existing ``target`` is moved aside first, then deleted), on any
    error it is removed. The parent directory must exist."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
            os.rename(target, os.path.join(old, "x"))
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
