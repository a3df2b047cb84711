"""PEFT export: a Gaussian LoRA adapter as a standard PEFT LoRA folder (+ scale sidecar), round trips."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_bayes_lora_architectures import make_tiny, random_params

import abmll.checkpoint as checkpoint_mod
from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.checkpoint import CheckpointError, file_sha256, read_tensors, save_adapter
from abmll.export import (
    PEFT_CONFIG,
    PEFT_TENSORS,
    SCALE_TENSORS,
    export_peft,
    is_peft_export,
    load_adapter_folder,
)

IDS = torch.tensor([[3, 50, 7, 21, 99, 12], [4, 4, 8, 15, 16, 23]])
MASK = torch.ones_like(IDS)


def _abmll_and_params(arch: str, seed: int = 1):
    model = BayesLoraModel(make_tiny(arch), BayesLoraConfig(rank=3, alpha=6, target_modules=["auto"]))
    return model, random_params(model, seed)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_peft_loads_export_with_identical_posterior_mean_logits(arch, tmp_path):
    model, params = _abmll_and_params(arch)
    export_peft(tmp_path, params, {"kind": "posterior"}, model=model, base_model_name_or_path="my/base")
    peft_model = PeftModel.from_pretrained(make_tiny(arch), tmp_path).eval()
    with torch.no_grad():
        ours = model(params, IDS, MASK).logits
        theirs = peft_model(input_ids=IDS, attention_mask=MASK).logits
        base = make_tiny(arch)(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert (theirs - base).abs().max() > 1e-3  # the adapter is really applied

    cfg = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 6 and cfg["base_model_name_or_path"] == "my/base"
    assert cfg["target_modules"] == (["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"])
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    saved = load_file(tmp_path / PEFT_TENSORS)
    assert len(saved) == len(model.mean_keys()) and not any(".default." in k for k in saved)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in saved)
    assert set(load_file(tmp_path / SCALE_TENSORS)) == {L.scale_A for L in model.layers} | {L.scale_B for L in model.layers}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reload_gives_back_all_four_tensors_exactly(arch, tmp_path):
    model, params = _abmll_and_params(arch, seed=2)
    config = {"lora": {"rank": 3, "alpha": 6.0, "target_modules": ["auto"]}, "kind": "prior", "rho0": {"a": 0.5}}
    export_peft(tmp_path, params, config, model=model)
    assert is_peft_export(tmp_path)
    tensors, saved = load_adapter_folder(tmp_path)
    assert set(tensors) == set(params)
    for k, v in params.items():
        assert torch.equal(tensors[k], v), k
    assert saved["kind"] == "prior" and saved["rho0"] == {"a": 0.5} and saved["format"] == "peft"
    torch.manual_seed(0)
    with torch.no_grad():
        first = model(params, IDS, MASK, sample=True).logits
    torch.manual_seed(0)
    with torch.no_grad():
        again = model(tensors, IDS, MASK, sample=True).logits  # the same Gaussian: the same samples
    assert torch.equal(first, again)


def test_export_from_config_alone_matches_export_from_model(tmp_path):
    model, params = _abmll_and_params("llama", seed=3)
    export_peft(tmp_path / "a", params, {}, model=model)
    export_peft(tmp_path / "b", params, {"lora": {"rank": 3, "alpha": 6.0, "target_modules": ["auto"]}})
    a, b = load_file(tmp_path / "a" / PEFT_TENSORS), load_file(tmp_path / "b" / PEFT_TENSORS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "b" / PEFT_CONFIG).read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["r"] == 3  # read off the tensor keys
    peft_model = PeftModel.from_pretrained(make_tiny("llama"), tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, model(params, IDS).logits, rtol=0, atol=1e-6)


def test_abmll_layout_also_loads_and_bad_folders_are_named(tmp_path):
    model, params = _abmll_and_params("llama", seed=4)
    save_adapter(tmp_path / "native", params, {"kind": "prior"})
    tensors, cfg = load_adapter_folder(tmp_path / "native")
    assert cfg == {"kind": "prior"} and all(torch.equal(tensors[k], params[k]) for k in params)

    export_peft(tmp_path / "exp", params, {}, model=model)
    (tmp_path / "exp" / SCALE_TENSORS).unlink()  # a plain PEFT adapter: no Gaussian scale
    with pytest.raises(CheckpointError, match=SCALE_TENSORS):
        load_adapter_folder(tmp_path / "exp")
    with pytest.raises(CheckpointError, match="not an abmll adapter folder"):
        load_adapter_folder(tmp_path)

    export_peft(tmp_path / "trunc", params, {}, model=model)
    (tmp_path / "trunc" / PEFT_TENSORS).write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=PEFT_TENSORS):
        load_adapter_folder(tmp_path / "trunc")

    export_peft(tmp_path / "mismatch", params, {}, model=model)
    scale, metadata = read_tensors(tmp_path / "mismatch" / SCALE_TENSORS)
    save_file(dict(list(scale.items())[1:]), tmp_path / "mismatch" / SCALE_TENSORS, metadata=metadata)
    config_file = tmp_path / "mismatch" / "abmll_config.json"  # written so, not damaged: its checksum recorded
    config = json.loads(config_file.read_text())
    config["sha256"][SCALE_TENSORS] = file_sha256(tmp_path / "mismatch" / SCALE_TENSORS)
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mean and scale pairs"):
        load_adapter_folder(tmp_path / "mismatch")


def test_export_is_written_as_a_unit_and_a_mixed_folder_is_refused(tmp_path):
    """An export interrupted while writing onto an existing one leaves the old folder intact;
    files of two different exports put together are refused, naming them."""
    model, params = _abmll_and_params("llama", seed=5)
    other = {k: v + 1 for k, v in params.items()}
    export_peft(tmp_path / "a", params, {"kind": "old"}, model=model)
    calls = []

    def failing_write(path, write):  # the mean tensors (after the scale and config) fail
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_write(path, write)

    real_write = checkpoint_mod.atomic_write
    checkpoint_mod.atomic_write = failing_write
    try:
        with pytest.raises(OSError, match="disk full"):
            export_peft(tmp_path / "a", other, {"kind": "new"}, model=model)
    finally:
        checkpoint_mod.atomic_write = real_write
    assert [p.name for p in calls] == [SCALE_TENSORS, "abmll_config.json", PEFT_TENSORS]
    got, config = load_adapter_folder(tmp_path / "a")
    assert config["kind"] == "old" and all(torch.equal(got[k], params[k]) for k in params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left

    export_peft(tmp_path / "b", other, {"kind": "new"}, model=model)
    shutil.copy(tmp_path / "b" / SCALE_TENSORS, tmp_path / "a" / SCALE_TENSORS)  # a half-replaced folder
    with pytest.raises(CheckpointError, match="not written by the same save"):
        load_adapter_folder(tmp_path / "a")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_peft(tmp_path / "c", params, {}, model=model)


def test_export_refuses_incomplete_or_foreign_tensors(tmp_path):
    model, params = _abmll_and_params("llama", seed=5)
    one = next(k for k in params if k.endswith("bayes_scale_B"))
    with pytest.raises(ValueError, match="lacks some of its four"):
        export_peft(tmp_path, {k: v for k, v in params.items() if k != one}, {}, model=model)
    with pytest.raises(ValueError, match="not a Gaussian LoRA tensor"):
        export_peft(tmp_path, {**params, "model.embed_tokens.weight": torch.zeros(2)}, {}, model=model)
    other, other_params = _abmll_and_params("gpt2")
    with pytest.raises(ValueError, match="do not match the model"):
        export_peft(tmp_path, other_params, {}, model=model)
    with pytest.raises(ValueError, match="rank and alpha"):
        export_peft(tmp_path, params, {})
    save_adapter(tmp_path / "native", params, {})
    with pytest.raises(ValueError, match="not empty and not an exported adapter"):
        export_peft(tmp_path / "native", params, {}, model=model)
    assert not (tmp_path / PEFT_TENSORS).exists()


def _peft_modules(peft_model) -> set[str]:
    """Names (without peft's prefix) of the modules that got a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


SELECTIONS = [  # (target_modules, top_layers)
    (["auto"], 0),
    (["auto"], 1),
    ("first", 0),  # a subset of the preset's modules
    ("first", 1),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2", "opt"])
@pytest.mark.parametrize("targets,top", SELECTIONS)
@pytest.mark.parametrize("from_model", [True, False])
def test_every_export_describes_exactly_what_it_holds(arch, targets, top, from_model, tmp_path):
    """Any layer selection, any architecture, prior or posterior, exported with the model or
    from its config alone: plain peft loads it without a missing or unexpected key, builds a
    LoRA module exactly where the file has weights, and gives abmll's posterior-mean logits."""
    import warnings

    from abmll.targets import preset_target_modules

    base = make_tiny(arch)
    if targets == "first":
        targets = preset_target_modules(base.config.model_type)[:1]
    model = BayesLoraModel(base, BayesLoraConfig(rank=2, alpha=4, target_modules=targets, top_layers=top))
    params = random_params(model, 7)
    lora = {"rank": 2, "alpha": 4.0, "target_modules": targets, "top_layers": top}
    for kind in ("prior", "posterior"):
        folder = tmp_path / kind
        export_peft(folder, params, {"lora": lora, "kind": kind}, model=model if from_model else None)
        saved = {k.removesuffix(".lora_A.weight").removeprefix("base_model.model.") for k in load_file(folder / PEFT_TENSORS)}
        saved = {k for k in saved if not k.endswith(".lora_B.weight")}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(make_tiny(arch), folder).eval()
        keys = [str(w.message) for w in caught if "adapter keys" in str(w.message) or "unexpected" in str(w.message).lower()]
        assert keys == [], keys
        assert _peft_modules(peft_model) == saved  # a module for every weight, a weight for every module
        cfg = json.loads((folder / PEFT_CONFIG).read_text())
        expected_layers = [1] if top else [0, 1]
        assert cfg["layers_to_transform"] == expected_layers
        if from_model or arch != "gpt2":  # without the model a Conv1D layout is flagged by peft itself
            with torch.no_grad():
                theirs = peft_model(input_ids=IDS, attention_mask=MASK).logits
                ours = model(params, IDS, MASK).logits
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_a_changed_byte_in_an_export_is_refused_and_an_older_export_still_loads(tmp_path):
    """Both tensor files of an export are checked against the sha256 its abmll_config.json
    records; an export of older abmll, without them, loads as before."""
    import hashlib
    import re

    from test_checkpoint import flip_a_bit

    from abmll.checkpoint import CONFIG, SHA256
    from abmll.export import load_peft_export

    model, params = _abmll_and_params("llama", seed=6)
    for name in (PEFT_TENSORS, SCALE_TENSORS):
        folder = tmp_path / name
        export_peft(folder, params, {"kind": "posterior"}, model=model)
        sums = json.loads((folder / CONFIG).read_text())[SHA256]
        assert sums == {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in (PEFT_TENSORS, SCALE_TENSORS)}
        flip_a_bit(folder / name)
        with pytest.raises(CheckpointError, match=f"{re.escape(str(folder / name))}: damaged: its sha256") as err:
            load_adapter_folder(folder)
        assert str(err.value).endswith(
            "write the adapter again (abmll export / abmll adapt), or download or copy it again from where it came from"
        )
    older = tmp_path / "older"
    export_peft(older, params, {"kind": "posterior"}, model=model)
    config = json.loads((older / CONFIG).read_text())
    (older / CONFIG).write_text(json.dumps({k: v for k, v in config.items() if k != SHA256}))
    tensors, cfg = load_peft_export(older)
    assert cfg == {"kind": "posterior", "format": "peft"}
    assert tensors.keys() == params.keys() and all(torch.equal(tensors[k], params[k]) for k in params)


def test_export_records_a_base_that_loads_from_another_folder(tmp_path, monkeypatch):
    # the user gives the base as a relative folder; the adapter must not depend on where they ran
    from conftest import make_tiny_llama, make_tiny_tokenizer
    from peft import AutoPeftModelForCausalLM

    from abmll.models import load_base_model

    (tmp_path / "work").mkdir()
    make_tiny_llama().save_pretrained(tmp_path / "work" / "tiny-llama")
    make_tiny_tokenizer().save_pretrained(tmp_path / "work" / "tiny-llama")
    monkeypatch.chdir(tmp_path / "work")
    base, _ = load_base_model("tiny-llama")
    model = BayesLoraModel(base, BayesLoraConfig(rank=2))
    params = random_params(model, 3)
    out = tmp_path / "work" / "posterior"
    export_peft(out, params, {"model": {"model": "tiny-llama"}, "kind": "posterior"}, model=model)
    recorded = json.loads((out / PEFT_CONFIG).read_text())["base_model_name_or_path"]
    assert recorded == str(tmp_path / "work" / "tiny-llama")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # reads base_model_name_or_path
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(params, IDS).logits, rtol=0, atol=1e-6)


def test_portable_name_is_what_another_machine_loads_the_base_by(tmp_path, monkeypatch):
    from abmll.models import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, portable_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    assert portable_name(DEFAULT_MODEL) == DEFAULT_MODEL_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("folder") == str(tmp_path / "folder")
    assert portable_name("models/gemma.gguf") == str(tmp_path / "models" / "gemma.gguf")  # the file, not its cache
    assert portable_name("google/gemma-3-270m") == "google/gemma-3-270m"
