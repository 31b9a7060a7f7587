"""The exported models on disk: one folder per model content and tool versions, built once.

A model's folder is named by :func:`cache_key` (the export recipe, the versions of the
tools that shape the graph, and every file of the model folder). It is built in a
temporary folder and renamed into place, under a file lock: workers starting together
export once and never see a half-written model. A cached model needs neither torch
nor transformers at run time: ONNX Runtime or OpenVINO plus the model's fast
tokenizer (``tokenizer.json``) run it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sieve.encoders.onnx_export import KEY_PACKAGES, RECIPE, export_models, package_version
from sieve.encoders.st_model import ModelLayout
from sieve.progress import SILENT, Progress

# Written last into a built folder: a folder without it is not a usable export.
META_FILE = "meta.json"


def cache_key(directory: Path) -> str:
    """SHA-256 over the recipe, the tool versions and every file of the model folder (path and content)."""
    digest = hashlib.sha256(RECIPE.encode())
    for package in KEY_PACKAGES:
        digest.update(f"\n{package}=={package_version(package)}".encode())
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and ".git" not in p.parts):
        with path.open("rb") as handle:
            file_digest = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"\n{path.relative_to(directory).as_posix()}:{file_digest}".encode())
    return digest.hexdigest()


def cache_folder(cache_dir: Path, layout: ModelLayout) -> Path:
    """Where the model's ONNX exports live: ``<cache_dir>/<name>-<key prefix>``."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", layout.name)[:60]
    return Path(cache_dir) / f"{readable}-{cache_key(layout.directory)[:20]}"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish_folder(built: Path, final: Path) -> bool:
    """Rename a complete folder into place; False (and ``built`` removed) if one is already there."""
    try:
        os.rename(built, final)
        return True
    except OSError:
        if (final / META_FILE).is_file():
            shutil.rmtree(built, ignore_errors=True)
            return False
        raise


def ensure_onnx_models(
    layout: ModelLayout, cache_dir: str | Path, *, progress: Progress = SILENT
) -> tuple[Path, bool]:
    """The cached ONNX models' folder, exported first if missing; and whether this call built it."""
    final = cache_folder(Path(cache_dir), layout)
    if (final / META_FILE).is_file():
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder per model at a time (others wait, then find it built); the rename
    # below keeps the folder all-or-nothing even where the lock does not reach (flock
    # does not span hosts on some network file systems).
    with _file_lock(final.parent / f".{final.name}.lock"):
        if (final / META_FILE).is_file():
            return final, False
        if final.exists():  # a folder without meta: left by hand or by an older layout
            shutil.rmtree(final)
        building = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            meta = export_models(layout, building, progress=progress)
            (building / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            building.chmod(0o755)  # mkdtemp's 0700 would keep other users' workers out
            return final, publish_folder(building, final)
        finally:
            shutil.rmtree(building, ignore_errors=True)
