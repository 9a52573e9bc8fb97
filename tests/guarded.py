"""The user's model folder, hashed: every refusal test asserts it is byte for byte, mode for mode, what
it was before the command ran (files, folders, symlinks, hidden ones included)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def tree_hash(folder: Path) -> dict[str, str]:
    """Relative path -> kind, mode and content hash of everything under `folder` (symlinks not followed)."""
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs + files):
            p = Path(root) / name
            st = p.lstat()
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                out[rel] = f"link {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = f"dir {st.st_mode:o}"
            else:
                out[rel] = f"file {st.st_mode:o} {hashlib.sha256(p.read_bytes()).hexdigest()}"
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
