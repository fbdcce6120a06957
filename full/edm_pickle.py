"""EDM's released .pkl denoisers (NVlabs/edm), read without running any code they carry."""
from __future__ import annotations

from pathlib import Path


def read_pickle(path: Path, obj, arch: str = "", kind: str = "") -> dict | None:
    """checkpoints.import_official's reader for EDM pickles (not yet implemented: None)."""
    return None
