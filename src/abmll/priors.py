"""Priors shipped inside the package, addressed by a short name.

Each is an adapter folder under ``src/abmll/priors/<name>/`` (``adapter.safetensors``,
``abmll_config.json``, and its record: ``record.json`` with the command, commit, meta-steps and
validation curve). Every command that reads an adapter folder (``evaluate --prior``,
``adapt --prior``, ``predict --adapter``, ``export --adapter``) takes either a path or one of
these names.
"""

from __future__ import annotations

import os
import sys
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
    raise FileNotFoundError(
        f"{name_or_path}: no such adapter folder, and not a shipped prior (shipped: {', '.join(shipped_priors()) or 'none'})"
    )


def prior_status(saved: dict, folder: str | os.PathLike) -> dict | None:
    """Whether the prior saved with config ``saved`` (an adapter's abmll_config.json) finished
    its meta-training: ``{"prior", "meta_steps_done", "meta_steps", "complete"}``; for a
    posterior, the status of the prior it was adapted from; None for an adapter that comes
    from no meta-trained prior.
    ``meta_steps_done`` counts the run's steps (for a ``best/`` prior, the run's, not the
    selected step's)."""
    if isinstance(saved.get("prior_status"), dict):  # a posterior adapted from a prior: the prior's
        return saved["prior_status"]
    if saved.get("kind") != "prior" or not isinstance(saved.get("meta"), dict):
        return None
    total = saved["meta"].get("meta_steps")
    done = saved.get("run_meta_steps_done", saved.get("meta_steps_done"))
    if not isinstance(total, int) or not isinstance(done, int):
        return None
    return {"prior": str(folder), "meta_steps_done": done, "meta_steps": total, "complete": done >= total}


def warn_if_unfinished(status: dict | None) -> None:
    """Print a loud warning on stderr when ``status`` (:func:`prior_status`) is an unfinished prior."""
    if status is not None and not status["complete"]:
        print(
            f"WARNING: the prior {status['prior']} is unfinished: {status['meta_steps_done']} of "
            f"{status['meta_steps']} meta-steps (an interrupted run). Results made from it are marked "
            f'"prior_complete": false. Finish it with: abmll meta-train --out {status["prior"]} --resume',
            file=sys.stderr,
        )
