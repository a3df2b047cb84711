"""Priors shipped inside the package, addressed by a short name.

Each is an adapter folder under ``src/abmll/priors/<name>/`` (``adapter.safetensors``,
``abmll_config.json``, and its record: ``record.json`` with the command, commit, meta-steps and
validation curve). Every command that reads an adapter folder (``evaluate --prior``,
``adapt --prior``, ``predict --adapter``, ``export --adapter``) takes either a path or one of
these names.
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).with_name("priors")


def shipped_priors() -> list[str]:
    """Short names of the priors shipped with the package (sorted)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "abmll_config.json").is_file())


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """The folder of ``name_or_path``: an existing path as it is, else a shipped prior's folder.

    Raises:
        FileNotFoundError: neither a folder nor a shipped prior's name (the message lists the names).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path) in shipped_priors():
        return SHIPPED_DIR / str(name_or_path)
    raise FileNotFoundError(f"{name_or_path}: no such adapter folder, and not a shipped prior "
                            f"(shipped: {', '.join(shipped_priors()) or 'none'})")
