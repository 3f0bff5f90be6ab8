"""Filesystem helpers shared by the stages."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imtext.errors import ImtextError


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` only if the block succeeds.

    A failed or interrupted run leaves the previous ``target`` untouched, so bad input never
    destroys earlier output.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ImtextError(f"{target}: exists and is not a directory; choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old)
