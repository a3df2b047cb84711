"""Shared fixtures: tiny random models and a byte-level tokenizer, built offline."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from abmll.testing import tiny_llama as make_tiny_llama
from abmll.testing import tiny_tokenizer as make_tiny_tokenizer


def readable_option(text: str) -> bool:
    """Has a letter, number, punctuation mark or symbol: what a valid option needs (options that
    are blank, invisible or control characters only are refused by design)."""
    return any(unicodedata.category(ch)[0] in "LNPS" for ch in text)


def option_key(text: str) -> str:
    """Options equal under this key (NFC, surrounding whitespace) are refused as duplicates."""
    return unicodedata.normalize("NFC", text).strip()


def rule_rows(rng, n: int) -> list[tuple[str, str]]:
    """``n`` (input, answer) rows of the rule "yes iff the input contains q": 5 random letters
    of a-h drawn from ``rng``, every second row with a q in the middle."""
    out = []
    for i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(5))
        if i % 2:
            word = word[:2] + "q" + word[3:]
        out.append((word, "yes" if "q" in word else "no"))
    return out


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


def write_task(root, task: str, rows_by_file: dict[str, list[tuple[str, str]]], options=("no", "yes")) -> None:
    """Write MetaICL-layout files ``root/task/<task>_<suffix>.jsonl`` from (input, output) rows."""
    import json

    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, rows in rows_by_file.items():
        lines = [json.dumps({"task": task, "input": x, "output": y, "options": list(options)}) for x, y in rows]
        (folder / f"{task}_{suffix}.jsonl").write_text("\n".join(lines) + "\n")
    meta = root / "task_meta"
    meta.mkdir(exist_ok=True)
    (meta / f"{task}.json").write_text(json.dumps({"task_type": "classification", "options": list(options)}))


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A MetaICL-layout folder: 4 train tasks and 2 test tasks sharing the rule
    "yes iff the input contains q", k=4, seeds 1 and 2, and a split "tiny"."""
    import json
    import random

    root = tmp_path / "data"
    rng = random.Random(0)

    for task in ["t0", "t1", "t2", "t3", "h0", "h1"]:
        files = {f"4_{s}_{part}": rule_rows(rng, 4) for s in (1, 2) for part in ("train", "dev")}
        files["test"] = rule_rows(rng, 6)
        write_task(root, task, files)
    (root / "splits").mkdir()
    (root / "splits" / "tiny.json").write_text(json.dumps({"train": ["t0", "t1", "t2", "t3"], "test": ["h0", "h1"]}))
    return root


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama and its tokenizer saved as a Hugging Face folder."""
    folder = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored after): tests that time or spawn processes
    must not oversubscribe the 2 cores they share with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, tiny data (rule: "yes" iff the input contains q) and a prior
    meta-trained by ``abmll meta-train --config run.yaml`` with flags overriding the file."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-llama"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "data"
    for task in ["t0", "t1", "h0"]:
        files = {f"4_1_{part}": rule_rows(rng, 4) for part in ("train", "dev")}
        files["test"] = rule_rows(rng, 6)
        write_task(data, task, files)
    (data / "splits").mkdir()
    (data / "splits" / "tiny.json").write_text(json.dumps({"train": ["t0", "t1"], "test": ["h0"]}))
    config = root / "run.yaml"
    config.write_text(
        f"model:\n  model: {model_dir}\n"
        "lora:\n  rank: 2\n  init_std_factor: 1.0\n"  # visible weight noise
        "scoring:\n  max_rows: 8\n"
        "meta:\n  inner_steps: 1\n  outer_lr: 0.05\n  meta_steps: 5\n"
        f"tasks:\n  data_dir: {data}\n  split: tiny\n  k: 4\n  data_seeds: [1]\n"
        "eval:\n  test_steps: 1\n  max_test: 6\n"
        "sample_seed: 3\n"  # an option of `abmll predict`: ignored by the other commands
        "shots: [4]\n"
    )  # an option of `abmll data`
    prior = root / "prior"
    from abmll.cli import main

    assert main(["meta-train", "--config", str(config), "--meta_steps", "2", "--out", str(prior)]) == 0
    return {"root": root, "model_dir": model_dir, "data": data, "config": config, "prior": prior}


def cli_flags(**flags) -> list[str]:
    """``--name value`` CLI arguments from keywords: a list or tuple gives several values, a
    bool ``true`` / ``false``; order kept."""
    out = []
    for name, value in flags.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        out += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return out


def tiny_cli(model_dir, data_dir, **flags) -> list[str]:
    """The flags every CLI test on the tiny world shares (the tiny model and data, k = 4, data
    seeds 1 and 2, LoRA rank 2, 8 rows per batch), then ``flags`` (:func:`cli_flags`)."""
    return cli_flags(model=model_dir, data_dir=data_dir, k=4, data_seeds=[1, 2], rank=2, max_rows=8, **flags)
