"""Keep the libraries' own output (warnings, logs, loading bars) out of a command's output
unless the user asks for it (``--verbose``)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

LIBRARIES = r"(transformers|peft|accelerate|huggingface_hub|torch|datasets)(\.|$)"
"""Modules whose warnings :func:`library_output` hides (abmll's own are always shown)."""


@contextmanager
def library_output(verbose: bool):
    """Unless ``verbose``: hide the libraries' warnings (every FutureWarning, and any warning
    issued from a :data:`LIBRARIES` module), transformers' log below ERROR and its progress
    bars (the weight-loading bar) while the block runs; restored afterwards."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", module=LIBRARIES)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
