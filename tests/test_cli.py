"""End to end on a tiny model and tiny MetaICL-layout data: meta-train, evaluate, reload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_cli

from abmll.checkpoint import load_adapter
from abmll.cli import main
from abmll.config import EvalArgs, RunConfig, TaskArgs
from abmll.episodes import episode_batches
from abmll.evaluate import Method, evaluate
from abmll.loading import load_prior
from abmll.meta import MetaConfig, adapt, predict_batches
from abmll.metrics import compute_metrics
from abmll.outputs import ResultLog


def common(tiny_model_dir, tiny_data_dir):
    return tiny_cli(tiny_model_dir, tiny_data_dir, split="tiny")


def test_meta_train_then_evaluate(tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert (
        main(
            [
                "meta-train",
                *common(tiny_model_dir, tiny_data_dir),
                "--meta_steps",
                "3",
                "--inner_steps",
                "2",
                "--beta",
                "1e-6",
                "--out",
                str(out),
                "--save_every",
                "2",
                "--log_support_after",
            ]
        )
        == 0
    )
    theta, cfg = load_adapter(out)
    assert cfg["kind"] == "prior" and cfg["meta_steps_done"] == 3
    assert cfg["meta"]["inner_steps"] == 2 and cfg["lora"]["rank"] == 2
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2]
    assert {"query_nll", "kl", "hyperprior", "support_nll_before", "support_nll_after", "tasks"} <= history[0].keys()

    kept = []  # each (method, task, seed) result with its predictions, as streamed to results.partial.jsonl
    real_append = ResultLog.append
    monkeypatch.setattr(ResultLog, "append", lambda log, entry: (kept.append(entry), real_append(log, entry))[1])
    assert (
        main(
            [
                "evaluate",
                *common(tiny_model_dir, tiny_data_dir),
                "--prior",
                str(out),
                "--out",
                str(out),
                "--test_steps",
                "2",
                "--eval_samples",
                "2",
                "--max_test",
                "6",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "mean over tasks" in printed and "h0" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["h0", "h1"] and results["seeds"] == [1, 2]
    assert sorted((e["method"], e["task"], e["seed"]) for e in kept) == [
        (m, t, s) for m in ("abmll", "zero_shot") for t in ("h0", "h1") for s in (1, 2)
    ]
    for e in kept:  # every reported metric is that of the run's predictions
        probs, labels = torch.tensor(e["probs"]), torch.tensor(e["labels"])
        reported = results["methods"][e["method"]]["per_task"][e["task"]]["seeds"][str(e["seed"])]
        metrics = compute_metrics(probs, labels)
        assert {k: reported[k] for k in metrics} == pytest.approx(metrics, abs=1e-6)
        assert reported["accuracy"] == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
        assert reported["nll"] == pytest.approx(-probs[torch.arange(len(labels)), labels].log().mean().item(), abs=1e-6)
    for method in ("zero_shot", "abmll"):  # per task: the mean over seeds; overall: the mean over tasks
        res = results["methods"][method]
        for task in ("h0", "h1"):
            seeds = res["per_task"][task]["seeds"]
            assert set(seeds) == {"1", "2"}
            for key, value in res["per_task"][task]["mean"].items():
                assert value == pytest.approx((seeds["1"][key] + seeds["2"][key]) / 2, abs=1e-12)
        for key, value in res["mean"].items():
            assert value == pytest.approx(sum(res["per_task"][t]["mean"][key] for t in ("h0", "h1")) / 2, abs=1e-12)
    assert results["methods"]["abmll"]["mean"]["nll"] != pytest.approx(results["methods"]["zero_shot"]["mean"]["nll"])
    assert results["config"]["eval"]["test_steps"] == 2


def test_meta_train_twice_gives_the_same_prior_whatever_the_global_rng(tiny_model_dir, tiny_data_dir, tmp_path):
    """--seed (and init_seed) fix the run: the adapter init, task sampling and weight noise."""
    priors = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out = tmp_path / f"run{seed}"
        assert (
            main(
                [
                    "meta-train",
                    *common(tiny_model_dir, tiny_data_dir),
                    "--meta_steps",
                    "2",
                    "--n_samples",
                    "1",
                    "--plots",
                    "false",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        priors.append(load_adapter(out)[0])
    assert all(torch.equal(priors[0][k], priors[1][k]) for k in priors[0])


def test_a_saved_adapter_loads_at_the_same_alignment_every_time(tmp_path):
    """Where a loaded tensor sits in memory (its address modulo 64 bytes: which SIMD path
    reads it, hence the last bits of every sum over it) depends on the file only: loading
    the same adapter again gives bitwise the same numbers."""
    from abmll.checkpoint import save_adapter

    tensors = {"a": torch.arange(3.0), "b": torch.arange(5.0), "c": torch.ones(2, 7), "d": torch.ones(64, 33)}
    save_adapter(tmp_path / "p", tensors, {})
    loads = [load_adapter(tmp_path / "p")[0] for _ in range(20)]  # all kept alive: 20 different buffers
    assert all(torch.equal(loaded[k], v) for loaded in loads for k, v in tensors.items())
    patterns = {tuple(t.data_ptr() % 64 for t in loaded.values()) for loaded in loads}
    assert len(patterns) == 1, patterns


def test_saved_prior_reloads_to_identical_predictions(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    assert (
        main(["meta-train", *common(tiny_model_dir, tiny_data_dir), "--meta_steps", "2", "--outer_lr", "0.05", "--out", str(out)])
        == 0
    )
    history = json.loads((out / "history.json").read_text())
    assert "support_nll_before" in history[0] and "support_nll_after" not in history[0]  # off by default
    cfg = RunConfig()
    model, tok, theta, _ = load_prior(str(out), cfg)
    assert any(v.abs().sum() > 0 for k, v in theta.items() if "lora_B" in k)  # trained, not the init
    tasks = TaskArgs(data_dir=str(tiny_data_dir), k=4)
    ep = episode_batches(model, tok, "h0", 1, tasks, cfg.scoring, "test", None)
    first, _ = predict_batches(model, theta, ep.query, 0)
    model2, _, theta2, _ = load_prior(str(out))
    second, _ = predict_batches(model2, theta2, ep.query, 0)
    assert torch.equal(first, second)
    zero, _ = predict_batches(model2, model2.init_params(), ep.query, 0)
    assert (zero - first).abs().max() > 1e-6
    meta = MetaConfig()
    res = evaluate(model2, tok, [Method("abmll", theta2, 1, 0)], ["h0"], [1], tasks, cfg.scoring, meta, EvalArgs(max_test=4))
    got = res["methods"]["abmll"]["per_task"]["h0"]["seeds"][1]
    # the reloaded prior adapted one step on h0's support (seeded by the data seed), 4 test examples
    ep4 = episode_batches(model2, tok, "h0", 1, tasks, cfg.scoring, "test", 4)
    torch.manual_seed(1)
    post, _ = adapt(model2, theta2, ep4.support, 1, meta.inner_lr, meta.beta, meta.n_samples, meta.inner_grad_clip)
    probs, labels = predict_batches(model2, post, ep4.query, 0)
    assert len(labels) == 4 and got["accuracy"] == (probs.argmax(-1) == labels).float().mean().item()
    assert got["nll"] == pytest.approx(-probs[torch.arange(4), labels].log().mean().item(), abs=1e-6)


def test_bad_input_gives_clear_error(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    code = main(
        ["meta-train", *common(tiny_model_dir, tiny_data_dir), "--train_tasks", "t0", "nope", "--out", str(tmp_path / "x")]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "nope" in err and "skip" in err


def test_version_and_command_list_answer_without_importing_torch():
    """``abmll --version`` / ``abmll --help`` must not pay for importing torch and peft."""
    import subprocess
    import sys

    code = (
        "import sys; from abmll.__main__ import main; a = main(['--version']); b = main(['--help']); "
        "c = main(['no-such-command']); print(a, b, c, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "abmll 0.1.0" in out and "abmll meta-train" in out and out.strip().endswith("0 0 2 False")


def test_each_command_help_lists_only_its_flags_with_their_help(capsys):
    """``abmll adapt --help``: usage names the command, every flag has its docstring help,
    enumerations list their choices, and meta-training flags are absent."""
    with pytest.raises(SystemExit) as info:
        main(["adapt", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: abmll adapt")
    for absent in ("--resume", "--meta_steps", "--save_every", "--validate_every", "--tensorboard"):
        assert absent not in text
    assert "--support SUPPORT JSON-lines file of labelled examples" in text
    assert "--sampling {flipout,per_batch}" in text and "--dtype {float32,bfloat16,float16,fp32,bf16,fp16}" in text
    assert "--inner_lr INNER_LR SGD step size" in text or "--inner_lr INNER_LR" in text
    with pytest.raises(SystemExit) as info:
        main(["meta-train", "--help"])
    assert "--outer_update {abmll,reptile,second_order}" in " ".join(capsys.readouterr().out.split())


def test_stored_help_texts_match_the_parsers():
    """``abmll <command> --help`` prints a stored text (no torch import); it must be what the
    command's parser renders. After changing a flag: ``make help``."""
    from abmll.args import build_parser
    from abmll.cli import COMMAND_TABLE
    from abmll.flags import flags_in_help
    from abmll.helptext import HELP_DIR, command_help

    for command, spec in COMMAND_TABLE.items():
        stored = (HELP_DIR / f"{command}.txt").read_text(encoding="utf-8")
        assert stored == command_help(command), f"src/abmll/help/{command}.txt is stale: run `make help`"
        # the console entry checks flags against the stored text: the same set as the parser's
        parser, _ = build_parser(spec.groups, spec.args, command, None, spec.unused())
        assert flags_in_help(stored) == set(parser._option_string_actions), command
    demo = (HELP_DIR / "demo.txt").read_text(encoding="utf-8")
    k_help = demo.split("\n  --k K", 1)[1].split("\n  --", 1)[0]
    assert "(default: 8)" in k_help  # demo.yaml's k, not the dataclass's 16


def test_command_help_answers_without_importing_torch():
    import subprocess
    import sys

    from abmll.helptext import HELP_DIR

    code = (
        "import sys; from abmll.__main__ import main; a = main(['adapt', '--help']); "
        "b = main(['evaluate', '--prior', 'x', '-h']); print(a, b, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    adapt_help = (HELP_DIR / "adapt.txt").read_text(encoding="utf-8")
    assert out.startswith(adapt_help) and out.strip().endswith("0 0 False")
    assert "usage: abmll evaluate" in out


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["evaluate", "--split", "class_to_class"], "--prior is required"),
        (["evaluate", "--methods", "zero_shot", "abmll"], "--prior is required"),
        (["adapt", "--support", "s.jsonl"], "--prior is required"),
        (["predict"], "--adapter and --input are required"),
        (["export", "--out", "x"], "--adapter is required"),
        (["data"], "--task is required"),
    ],
)
def test_a_missing_required_flag_is_named_before_torch_is_imported(argv, missing):
    import subprocess
    import sys

    code = (
        "import sys; from abmll.__main__ import main\n"
        f"try: main({argv!r})\n"
        "except SystemExit as e: print(e)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert missing in out and out.strip().endswith("False"), out


def test_required_flags_given_or_not_needed_pass_the_early_check():
    from abmll.command_names import missing_required

    assert missing_required("evaluate", ["--prior", "p"]) is None
    assert missing_required("evaluate", ["--prior=p"]) is None
    assert missing_required("evaluate", ["--methods", "zero_shot", "lora", "--k", "16"]) is None  # no ABMLL: no prior
    assert missing_required("evaluate", ["--config", "run.yaml"]) is None  # the file may set it: the command checks
    assert missing_required("meta-train", []) is None


def test_a_refused_value_is_one_line_naming_the_flag_and_its_choices_not_the_usage_block(capsys):
    with pytest.raises(SystemExit) as info:
        main(["adapt", "--test_optimizer", "adam"])
    assert info.value.code == 2
    first, second = capsys.readouterr().err.splitlines()  # two lines, no usage block
    assert first.startswith("abmll adapt: error: argument --test_optimizer") and "invalid choice: 'adam'" in first
    assert "sgd" in first and "adamw" in first and second == "(run 'abmll adapt --help' for every flag and its choices)"


def test_a_mistyped_flag_names_the_nearest_ones():
    with pytest.raises(SystemExit, match="unknown flag --inner_lrr; did you mean --inner_lr"):
        main(["adapt", "--inner_lrr", "0.1"])
    with pytest.raises(SystemExit, match="unknown flag --resume"):
        main(["adapt", "--resume"])


def test_the_console_entry_names_a_mistyped_flag_before_importing_torch():
    import subprocess
    import sys

    code = (
        "import sys; from abmll.__main__ import main\n"
        "for argv in (['adapt', '--inner_lrr', '0.1'], ['meta-train', '--rank=4', '--outer-lr', '1', '--seeed', '1']):\n"
        "    try: main(argv)\n"
        "    except SystemExit as e: print(e)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [
        "abmll adapt: unknown flag --inner_lrr; did you mean --inner_lr or --inner_grad_clip or --test_lr?",
        "abmll meta-train: unknown flag --seeed; did you mean --seed or --init_seed or --save_every?",  # --x=v, aliases pass
        "False",
    ]


def test_public_api_resolves_from_the_package():
    import abmll

    for name in abmll.__all__:
        assert getattr(abmll, name) is not None, name
    from abmll.meta import adapt as adapt_fn

    assert abmll.adapt is adapt_fn
    with pytest.raises(AttributeError):
        abmll.no_such_name  # noqa: B018
