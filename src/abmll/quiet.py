"""Keep the libraries' own output (warnings, logs, loading bars) out of a command's output
unless the user asks for it (``--verbose``), and print every warning on a line of its own,
never on a progress bar's line."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager

from tqdm.auto import tqdm

LIBRARIES = r"(transformers|peft|accelerate|huggingface_hub|torch|datasets)(\.|$)"
"""Modules whose warnings :func:`library_output` hides (abmll's own are always shown)."""


@contextmanager
def library_output(verbose: bool):
    """Unless ``verbose``: hide the libraries' warnings (every FutureWarning, and any warning
    issued from a :data:`LIBRARIES` module), transformers' log below ERROR and its progress
    bars (the weight-loading bar) while the block runs; restored afterwards. Either way, a
    warning shown while a progress bar is on screen clears the bar, is printed on its own line
    and the bar is redrawn below it (:func:`warnings_above_bars`)."""
    with warnings_above_bars():
        if verbose:
            yield
            return
        with _libraries_quiet():
            yield


@contextmanager
def warnings_above_bars():
    """While the block runs, show each warning through ``tqdm.external_write_mode`` (as
    ``tqdm.write`` does): open progress bars on the terminal are cleared, the warning is
    printed by the ``warnings.showwarning`` in place when the block began, and the bars are
    redrawn. That hook is wrapped, not replaced, so a ``catch_warnings(record=True)`` around
    the block still records every warning; restored afterwards."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        with tqdm.external_write_mode(file=file or sys.stderr):
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


@contextmanager
def _libraries_quiet():
    """The quiet half of :func:`library_output`."""
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
