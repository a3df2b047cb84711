"""Building the model an adapter belongs to, and loading an adapter onto it."""

from __future__ import annotations

from abmll.bayes_lora import BayesLoraModel
from abmll.checkpoint import CONFIG, CheckpointError
from abmll.config import RunConfig, from_dict
from abmll.export import load_adapter_folder
from abmll.models import load_base_model, resolve_device
from abmll.priors import prior_status, resolve_adapter, warn_if_unfinished


def build_model(cfg: RunConfig, device=None):
    m = cfg.model
    base, tokenizer = load_base_model(m.model, m.dtype, resolve_device(m.device if device is None else device))
    model = BayesLoraModel(base, cfg.lora)
    cfg.lora = model.config  # target_modules resolved ("auto" -> the preset)
    return model, tokenizer


def load_prior(folder: str, cfg: RunConfig | None = None):
    """Build the model an adapter folder (abmll or exported PEFT layout) belongs to and load
    its tensors. Config groups ``cfg`` lacks (all, when it is None) are filled in it from the
    folder's saved config.
    Returns (model, tokenizer, tensors, status): ``status`` is the
    :func:`abmll.priors.prior_status` of a prior (warned about loudly when unfinished), else None.

    Raises:
        CheckpointError: unreadable folder, or tensors that do not fit the model the config builds.
    """
    theta, saved, status = _read_adapter(folder)
    cfg = RunConfig() if cfg is None else cfg
    for group in ("model", "lora", "hyperprior", "scoring", "meta"):
        if getattr(cfg, group) is None:
            try:
                setattr(cfg, group, from_dict(saved, group, f"{folder}/{CONFIG}"))
            except ValueError as err:
                raise CheckpointError(str(err)) from None
    model, tokenizer = build_model(cfg)
    return (
        model,
        tokenizer,
        check_fits(
            theta,
            model,
            f"{folder}: its adapter tensors do not fit the model built from the config",
            f"model {cfg.model.model!r}, rank {cfg.lora.rank}",
        ),
        status,
    )


def fitting_prior(name: str, model: BayesLoraModel) -> tuple[dict, dict | None]:
    """The tensors of prior ``name`` (folder or shipped name), on the model's device, and its
    :func:`abmll.priors.prior_status` (warned about loudly when unfinished).

    Raises:
        CheckpointError: unreadable, or tensors that do not fit ``model``'s adapters.
    """
    folder = resolve_adapter(name)
    tensors, _, status = _read_adapter(folder)
    return check_fits(
        tensors,
        model,
        f"{folder}: its tensors do not fit this model's adapters",
        "compare priors made with the same model, rank, target_modules and top_layers",
    ), status


def _read_adapter(folder) -> tuple[dict, dict, dict | None]:
    """(tensors, saved config, :func:`abmll.priors.prior_status`) of an adapter folder, warning
    loudly when it comes from an unfinished prior."""
    tensors, saved = load_adapter_folder(folder)
    status = prior_status(saved, folder)
    warn_if_unfinished(status)
    return tensors, saved, status


def check_fits(tensors: dict, model: BayesLoraModel, problem: str, hint: str) -> dict:
    """``tensors`` moved to ``model``'s device, after checking they match its adapters' shapes.

    Raises:
        CheckpointError: ``problem`` with an example of the mismatch and ``hint``.
    """
    expected = {k: tuple(v.shape) for k, v in model.init_params().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:2]
        raise CheckpointError(f"{problem} ({hint}; e.g. {diff})")
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in tensors.items()}


def adapter_config(cfg: RunConfig, model: BayesLoraModel, **extra) -> dict:
    return {**cfg.to_dict(), "rho0": {L.name: L.rho0 for L in model.layers}, **extra}
