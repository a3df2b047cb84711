"""An adapter exported by abmll runs under lm-evaluation-harness (``lm_eval --model hf
--model_args pretrained=...,peft=...``) on a local JSON task, offline, and lm-eval's accuracy
equals abmll's own posterior-mean accuracy on the same prompts (an independent scorer).
Needs the optional ``lm-eval`` package (``pip install 'abmll[lm-eval]'``); skipped without it."""

from __future__ import annotations

import json

import pytest

from abmll.cli import main
from abmll.data import read_jsonl
from abmll.export import load_adapter_folder
from abmll.loading import load_prior
from abmll.meta import predict_batches
from abmll.metrics import accuracy
from abmll.scoring import ScoringConfig, make_batches

TASK_YAML = """task: abmll_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}\\nAnswer:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: "{{{{options.index(output)}}}}"
metric_list:
  - metric: acc
"""


def test_an_exported_posterior_runs_under_lm_eval_with_our_accuracy(world, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    test_file = world["data"] / "h0" / "h0_test.jsonl"
    post = tmp_path / "post"
    assert (
        main(["adapt", "--prior", str(world["prior"]), "--support", str(support), "--test_steps", "3", "--out", str(post)]) == 0
    )
    keys = json.loads((post / "adapter_config.json").read_text())
    assert keys["r"] == 2
    from safetensors import safe_open

    with safe_open(post / "adapter_model.safetensors", "pt") as f:
        assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in f.keys())  # standard LoRA keys only

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "abmll_local.yaml").write_text(TASK_YAML.format(test=test_file))
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={world['model_dir']},peft={post},dtype=float32",
        tasks=["abmll_local"],
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=2,
    )
    theirs = out["results"]["abmll_local"]["acc,none"]

    model, tok, _, _ = load_prior(str(world["prior"]))
    posterior, _ = load_adapter_folder(post)
    probs, labels = predict_batches(
        model, posterior, make_batches(tok, read_jsonl(test_file), ScoringConfig(template="{input}\nAnswer:")), 0
    )
    assert theirs == pytest.approx(accuracy(probs, labels))
