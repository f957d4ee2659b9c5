"""Files that hold secrets or tenants' data: readable by the service's own user alone."""

from __future__ import annotations

import os
from pathlib import Path


def private_file(path: Path) -> Path:
    """Create ``path`` (mode 0600) and its folder (0700 where new) if missing; narrow an
    existing file to 0600. Returns ``path``.

    Made before SQLite opens a database: SQLite gives its journal and WAL files the mode of
    the database file, so the whole database stays private whatever the process's umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)
    return path
