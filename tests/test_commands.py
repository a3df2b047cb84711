"""The CLI beyond meta-train/evaluate: YAML config for every command, export, adapt, predict,
plots, TensorBoard; all on a tiny random Llama and tiny MetaICL-layout data."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from conftest import cli_flags
from peft import PeftModel
from transformers import AutoModelForCausalLM

from abmll.checkpoint import load_adapter
from abmll.cli import main
from abmll.config import EvalArgs, RunConfig, TaskArgs, from_dict
from abmll.data import read_jsonl
from abmll.episodes import episode_batches
from abmll.evaluate import Method, evaluate, evaluate_with_predictions
from abmll.export import load_adapter_folder
from abmll.loading import load_prior
from abmll.meta import adapt, mean_nll, predict_batches
from abmll.methods import make_method
from abmll.metrics import compute_metrics
from abmll.plots import plot_reliability_per_method, plot_training_curves, pool_predictions
from abmll.scoring import ScoringConfig, make_batches
from abmll.uncertainty import choose_threshold
from abmll.validation import VAL_METRICS

PNG = b"\x89PNG\r\n\x1a\n"


def _ids():
    return torch.tensor([[3, 50, 7, 21, 99], [4, 4, 8, 15, 16]])


def test_meta_train_resolves_config_and_plots_curves(world):
    theta, cfg = load_adapter(world["prior"])
    assert cfg["meta_steps_done"] == 2 and cfg["meta"]["meta_steps"] == 2  # the flag beat the file
    assert cfg["meta"]["inner_steps"] == 1 and cfg["meta"]["outer_lr"] == 0.05  # the file beat the defaults
    assert cfg["lora"]["rank"] == 2 and cfg["scoring"]["max_rows"] == 8
    assert cfg["lora"]["target_modules"] == ["q_proj", "v_proj"]  # "auto" resolved for Llama
    curves = world["prior"] / "training_curves.png"
    assert curves.read_bytes()[:8] == PNG and curves.stat().st_size > 10_000


@pytest.mark.parametrize(
    "text,what",
    [
        ("meta:\n  inner_stepz: 3\n", "inner_stepz"),
        ("- inner_steps\n- 3\n", "must be a mapping"),
        ("3\n", "must be a mapping"),
        ("meta: [1, 2\n", "cannot read"),
        (None, "cannot read"),
    ],
    ids=["unknown-key", "a-list", "a-scalar", "not-yaml", "missing"],
)
def test_a_bad_config_file_is_refused_naming_the_file(tmp_path, text, what):
    bad = tmp_path / "bad.yaml"
    if text is not None:
        bad.write_text(text)
    with pytest.raises(SystemExit) as info:
        main(["meta-train", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert str(bad) in str(info.value) and what in str(info.value), info.value


def test_export_is_a_peft_adapter_with_abmll_posterior_mean_predictions(world, tmp_path):
    out = tmp_path / "peft"
    assert main(["export", "--config", str(world["config"]), "--adapter", str(world["prior"]), "--out", str(out)]) == 0
    cfg = RunConfig()
    model, _, theta, _ = load_prior(str(world["prior"]), cfg)
    assert any(v.abs().sum() > 0 for k, v in theta.items() if "lora_B" in k)  # a trained prior
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["model_dir"]), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=_ids()).logits, model(theta, _ids()).logits, rtol=0, atol=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(world["model_dir"])
    tensors, saved = load_adapter_folder(out)
    original, _ = load_adapter(world["prior"])
    assert tensors.keys() == original.keys() and all(torch.equal(tensors[k], original[k]) for k in original)
    assert saved["kind"] == "prior" and saved["exported_from"] == str(world["prior"])
    assert saved["lora"]["rank"] == 2


def test_adapt_then_predict(world, tmp_path, monkeypatch, capsys):
    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    run_file = tmp_path / "adapt.yaml"  # --prior and --support can come from the config file too
    run_file.write_text(f"prior: {world['prior']}\nsupport: {support}\ntest_steps: 3\n")
    post = tmp_path / "posterior"
    assert main(["adapt", "--config", str(run_file), "--inner_lr", "0.7", "--out", str(post)]) == 0
    posterior, saved = load_adapter_folder(post)
    assert saved["kind"] == "posterior" and saved["eval"]["test_steps"] == 3 and saved["meta"]["inner_lr"] == 0.7
    assert saved["meta"]["outer_lr"] == 0.05  # the prior's saved config fills the rest

    cfg = RunConfig()
    model, tok, theta, _ = load_prior(str(world["prior"]), cfg)
    batches = make_batches(tok, read_jsonl(support), ScoringConfig(max_rows=8))
    torch.manual_seed(cfg.meta.seed)
    expected, steps = adapt(model, theta, batches, 3, 0.7, cfg.meta.beta, cfg.meta.n_samples, cfg.meta.inner_grad_clip)
    for k in expected:  # the library's own adapt (to rounding: a BLAS may split sums by the load on the machine)
        torch.testing.assert_close(posterior[k], expected[k], rtol=1e-5, atol=1e-7)
    assert saved["support_nll_steps"] == pytest.approx(steps, abs=1e-6)
    assert saved["support_nll_before"] == pytest.approx(mean_nll(model, theta, batches), abs=1e-6)  # at the means
    assert saved["support_nll_after"] == pytest.approx(mean_nll(model, expected, batches), abs=1e-6)
    assert saved["support_nll_after"] < saved["support_nll_before"]  # 3 steps at lr 0.7 fit the support set
    assert any(not torch.equal(posterior[k], theta[k]) for k in theta)
    assert (post / "adapter_model.safetensors").is_file() and (post / "abmll_scale.safetensors").is_file()

    test_file = world["data"] / "h0" / "h0_test.jsonl"
    records = [json.loads(x) for x in test_file.read_text().splitlines()]
    unlabelled = dict(records[1])
    del unlabelled["output"]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("\n".join(json.dumps(r) for r in [records[0], unlabelled, *records[2:]]) + "\n")
    pred_dir = tmp_path / "pred"
    monkeypatch.chdir(tmp_path)  # the input given relative to where the command runs
    assert (
        main(["predict", "--adapter", str(post), "--input", "inputs.jsonl", "--eval_samples", "0", "--out", str(pred_dir)]) == 0
    )
    lines = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    ref_probs, ref_labels = predict_batches(
        model, posterior, make_batches(tok, read_jsonl(test_file), ScoringConfig(max_rows=8)), 0
    )
    assert len(lines) == len(records) == 6
    for line, p, record in zip(lines, ref_probs, records):
        probs = torch.tensor(line["probs"])
        torch.testing.assert_close(probs, p, rtol=0, atol=1e-6)
        assert line["options"] == record["options"] and line["prediction"] == record["options"][int(p.argmax())]
        assert line["entropy"] == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
        assert 0 <= line["entropy"] <= torch.log(torch.tensor(2.0)).item() + 1e-6
    assert "output" not in lines[1] and lines[0]["output"] == records[0]["output"]
    # abstention: coverage and accuracy on the kept lines, in the summary, by hand from the lines
    cut = sorted(line["entropy"] for line in lines)[3]  # abstain on the two most uncertain
    sel_dir = tmp_path / "sel"
    flags = ["--eval_samples", "0", "--abstain_above", str(cut), "--out", str(sel_dir)]
    assert main(["predict", "--adapter", str(post), "--input", "inputs.jsonl", *flags]) == 0
    kept = [line for line in lines if line["entropy"] <= cut]
    judged = [line for line in kept if "output" in line]
    selective = json.loads((sel_dir / "predict_config.json").read_text())["selective"]
    assert selective["kept"] == len(kept) and selective["abstained"] == 6 - len(kept) and selective["coverage"] == len(kept) / 6
    assert selective["selective_accuracy"] == pytest.approx(
        sum(line["prediction"] == line["output"] for line in judged) / len(judged)
    )
    # the threshold chosen on labelled dev rows for a target coverage, on the normalised scale
    for line in lines:
        assert line["normalised_entropy"] == pytest.approx(line["entropy"] / math.log(len(line["options"])), abs=1e-5)
    dev_dir = tmp_path / "dev"
    flags = ["--eval_samples", "0", "--abstain_dev", str(test_file), "--abstain_on", "normalised", "--out", str(dev_dir)]
    assert main(["predict", "--adapter", str(post), "--input", "inputs.jsonl", *flags, "--target_coverage", "0.5"]) == 0
    correct = torch.tensor([line["prediction"] == r["output"] for line, r in zip(lines, records)])
    by_hand = choose_threshold(torch.tensor([line["normalised_entropy"] for line in lines]), correct, target_coverage=0.5)
    chosen = json.loads((dev_dir / "predict_config.json").read_text())
    assert chosen["abstain_threshold"]["threshold"] == pytest.approx(by_hand["threshold"], abs=1e-5)
    assert chosen["abstain_threshold"]["coverage"] == by_hand["coverage"] >= 0.5
    assert chosen["abstain_threshold"]["target_coverage"] == 0.5 and chosen["abstain_threshold"]["abstain_dev"] == str(test_file)
    dev_lines = [json.loads(x) for x in (dev_dir / "predictions.jsonl").read_text().splitlines()]
    kept = [x["normalised_entropy"] for x in dev_lines if not x["abstain"]]
    dropped = [x["normalised_entropy"] for x in dev_lines if x["abstain"]]
    assert len(kept) == round(by_hand["coverage"] * 6) and max(kept) < min(dropped)  # the most uncertain are dropped
    assert chosen["selective"]["coverage"] == by_hand["coverage"]  # the input is the dev rows here
    u = torch.tensor([line["normalised_entropy"] for line in lines])
    perfect = [t for t in u.unique() if correct[u <= t].all()]  # thresholds whose kept rows are all right
    strict = [*flags, "--target_accuracy", "1.0", "--overwrite"]
    capsys.readouterr()
    if perfect:
        assert main(["predict", "--adapter", str(post), "--input", "inputs.jsonl", *strict]) == 0
        assert json.loads((dev_dir / "predict_config.json").read_text())["abstain_threshold"]["selective_accuracy"] == 1.0
    else:  # unreachable: the error names the dev file and the best there is
        assert main(["predict", "--adapter", str(post), "--input", "inputs.jsonl", *strict]) == 1
        assert f"--abstain_dev {test_file}: no abstention threshold reaches" in capsys.readouterr().err
    bad_flags = {
        "--abstain_dev FILE goes with": ["--target_coverage", "0.5"],
        "goes with exactly one": ["--abstain_dev", str(test_file)],
        "--target_coverage must be in": ["--abstain_dev", str(test_file), "--target_coverage", "2"],
        "chosen on --abstain_dev": ["--abstain_dev", str(test_file), "--target_coverage", "0.5", "--abstain_above", "1"],
    }
    capsys.readouterr()
    for message, bad in bad_flags.items():
        assert main(["predict", "--adapter", str(post), "--input", "inputs.jsonl", "--out", str(tmp_path / "x"), *bad]) == 1
        assert message in capsys.readouterr().err
    assert lines[0]["correct"] == (lines[0]["prediction"] == records[0]["output"])
    summary = json.loads((pred_dir / "predict_config.json").read_text())
    assert summary["labelled"] == 5 and "metrics" not in summary and summary["eval_samples"] == 0
    assert summary["lora"]["rank"] == 2
    assert summary["input"] == "inputs.jsonl" and summary["input_resolved"] == str(inputs.resolve())

    sampled = tmp_path / "sampled"
    for folder in (sampled, sampled / "again"):
        assert main(["predict", *cli_flags(adapter=post, input=test_file, eval_samples="3", sample_seed="5", out=folder)]) == 0
    first = (sampled / "predictions.jsonl").read_text()
    assert first == (sampled / "again" / "predictions.jsonl").read_text()  # seeded
    probs3 = torch.tensor([json.loads(x)["probs"] for x in first.splitlines()])
    assert (probs3 - ref_probs).abs().max() > 1e-5  # really sampled (values are rounded to 1e-6)
    metrics = json.loads((sampled / "predict_config.json").read_text())["metrics"]
    labels3 = torch.tensor([r["options"].index(r["output"]) for r in records])
    assert metrics == pytest.approx(compute_metrics(probs3, labels3), abs=1e-6)  # of the predictions written
    assert metrics["accuracy"] == pytest.approx((probs3.argmax(-1) == labels3).float().mean().item())
    assert metrics["nll"] == pytest.approx(-probs3[torch.arange(6), labels3].log().mean().item(), abs=1e-6)


def test_predict_names_the_bad_line_of_the_input(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"task": "x", "input": "a", "options": ["no", "yes"]}\n'
        '{"task": "x", "input": "b", "output": "maybe", "options": ["no", "yes"]}\n'
    )
    assert main(["predict", "--adapter", str(world["prior"]), "--input", str(bad), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "maybe" in err


def test_evaluate_plots_reliability_and_matches_library_evaluate(world, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", *cli_flags(config=world["config"], prior=world["prior"], eval_samples="2", out=out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for method in ("zero_shot", "abmll"):
        png = out / f"reliability_{method}.png"
        assert png.read_bytes()[:8] == PNG
    assert results["config"]["eval"]["eval_samples"] == 2 and results["config"]["eval"]["test_steps"] == 1

    # the library with the settings the command resolved: the prior's saved config, run.yaml's
    # tasks and eval settings, the --eval_samples flag
    cfg = RunConfig()
    model, tok, theta, _ = load_prior(str(world["prior"]), cfg)
    tasks = TaskArgs(data_dir=str(world["data"]), k=4, data_seeds=[1], test_tasks=["h0"])
    ev = EvalArgs(test_steps=1, eval_samples=2, max_test=6)
    methods = [Method("zero_shot", model.init_params(), 0, 0), Method("abmll", theta, 1, 2)]
    scoring, meta = ScoringConfig(max_rows=8), cfg.meta
    ref = evaluate(model, tok, methods, ["h0"], [1], tasks, scoring, meta, ev)
    got, predictions = evaluate_with_predictions(model, tok, methods, ["h0"], [1], tasks, scoring, meta, ev)
    assert got == ref
    cli = {m: results["methods"][m]["per_task"]["h0"]["seeds"]["1"] for m in ("zero_shot", "abmll")}
    lib = {m: got["methods"][m]["per_task"]["h0"]["seeds"][1] for m in ("zero_shot", "abmll")}
    for method in lib:
        assert cli[method] == pytest.approx(lib[method], rel=1e-6, abs=1e-9), method
    assert cli["abmll"]["nll"] != pytest.approx(cli["zero_shot"]["nll"], abs=1e-4)  # two different methods
    for method in ("zero_shot", "abmll"):  # the kept predictions are the ones behind the metrics
        ((probs, labels),) = predictions[method]
        assert probs.shape == (6, 2) and labels.tolist() == [e.label for e in read_jsonl(world["data"] / "h0" / "h0_test.jsonl")]
        seed_metrics = got["methods"][method]["per_task"]["h0"]["seeds"][1]
        assert compute_metrics(probs, labels) == {k: v for k, v in seed_metrics.items() if not k.startswith("mean_")}
        if method == "zero_shot":  # no weight samples: nothing epistemic
            assert seed_metrics["mean_epistemic"] == 0 and seed_metrics["mean_aleatoric"] == seed_metrics["mean_total"]


def test_evaluate_runs_the_registry_methods_it_is_asked_for(world, tmp_path, capsys):
    out = tmp_path / "eval"
    flags = ["evaluate", "--config", str(world["config"]), "--prior", str(world["prior"]), "--eval_samples", "2"]
    names = ["zero_shot", "lora_ensemble", "laplace_lora", "abmll_ts_support"]
    assert main([*flags, "--methods", *names, "--ensemble_members", "2", "--support_folds", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == names
    # the library, with the registry's method and the settings the command resolved
    cfg = RunConfig()
    model, tok, theta, _ = load_prior(str(world["prior"]), cfg)
    tasks = TaskArgs(data_dir=str(world["data"]), k=4, data_seeds=[1], test_tasks=["h0"])
    ev = EvalArgs(test_steps=1, eval_samples=2, max_test=6, ensemble_members=2, support_folds=2)
    methods = [make_method(n, theta if n.startswith("abmll") else model.init_params(), ev) for n in names]
    ref = evaluate(model, tok, methods, ["h0"], [1], tasks, ScoringConfig(max_rows=8), cfg.meta, ev)
    for name in names:
        cli = results["methods"][name]["per_task"]["h0"]["seeds"]["1"]
        assert cli == pytest.approx(ref["methods"][name]["per_task"]["h0"]["seeds"][1], rel=1e-5, abs=1e-7), name
    assert 0 < results["methods"]["abmll_ts_support"]["per_task"]["h0"]["seeds"]["1"]["temperature"]
    for bad, message in (
        ("lora_ts", "benchmarks/quality.py"),
        ("multitask_lora", "benchmarks/quality.py"),
        ("maml", "unknown method"),
    ):
        assert main([*flags, "--methods", "zero_shot", bad, "--out", str(tmp_path / bad)]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / bad).exists()  # refused before any work


def test_evaluate_without_a_prior_runs_zero_shot_and_lora_on_the_base_model(world, tmp_path):
    out = tmp_path / "eval"  # run.yaml names the model (a folder) and the adapter's shape
    assert main(["evaluate", "--config", str(world["config"]), "--methods", "zero_shot", "lora", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["zero_shot", "lora"]
    # the same numbers as with a prior: neither method reads it
    with_prior = tmp_path / "with"
    assert (
        main(
            ["evaluate", *cli_flags(config=world["config"], prior=world["prior"], methods=["zero_shot", "lora"], out=with_prior)]
        )
        == 0
    )
    again = json.loads((with_prior / "results.json").read_text())
    for m in ("zero_shot", "lora"):
        assert results["methods"][m]["mean"] == pytest.approx(again["methods"][m]["mean"], rel=1e-5), m


def test_tensorboard_flag_needs_tensorboard(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = main(
        ["meta-train", "--config", str(world["config"]), "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "run")]
    )
    assert code == 1
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_tensorboard_logs_scalars_through_summary_writer(world, tmp_path, monkeypatch):
    logged, closed = [], []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            logged.append((self.log_dir, tag, value, step))

        def close(self):
            closed.append(True)

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    out = tmp_path / "run"
    assert (
        main(
            [
                "meta-train",
                *cli_flags(config=world["config"], tensorboard=tmp_path / "tb", plots="false", meta_steps="2", out=out),
            ]
        )
        == 0
    )
    history = json.loads((out / "history.json").read_text())
    q = [(step, value) for _, tag, value, step in logged if tag == "meta_train/query_nll"]
    assert q == [(h["step"], h["query_nll"]) for h in history] and len(q) == 2
    assert {d for d, *_ in logged} == {str(tmp_path / "tb")} and closed == [True]
    assert not (out / "training_curves.png").exists()


def test_plot_helpers(tmp_path, monkeypatch):
    history = [
        {"step": 0, "query_nll": 0.9, "kl": 10.0, "support_nll_before": 1.0, "support_nll_after": 0.8},
        {"step": 1, "skipped": True, "error": "nan"},
        {"step": 2, "query_nll": 0.7, "kl": 12.0, "support_nll_before": 0.9, "support_nll_after": 0.6},
    ]
    path = plot_training_curves(history, tmp_path / "sub" / "curves.png")
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="query_nll"):
        plot_training_curves([{"step": 0, "skipped": True}], tmp_path / "none.png")

    a = (torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
    b = (torch.tensor([[0.1, 0.2, 0.7]]), torch.tensor([2]))
    probs, labels = pool_predictions([a, b])
    assert torch.equal(probs, torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.2, 0.7]]))
    assert labels.tolist() == [0, 0, 2]
    import abmll.plots

    titles, draw = [], abmll.plots.plot_reliability_diagram
    monkeypatch.setattr(abmll.plots, "plot_reliability_diagram", lambda *a, **k: titles.append(draw(*a, **k).axes[0].get_title()))
    paths = plot_reliability_per_method({"abmll": [a, b], "zero shot/x": [a]}, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["reliability_abmll.png", "reliability_zero_shot_x.png"]
    assert [t.count("N = ") for t in titles] == [1, 1] and "N = 3" in titles[0], titles  # N said once
    with pytest.raises(ValueError, match="no predictions"):
        pool_predictions([])


def test_readme_python_api_flow(world, tmp_path):
    """The README's "Python API: adapt, predict, export" snippet, on the tiny prior."""
    from abmll.bayes_lora import BayesLoraModel
    from abmll.config import from_dict
    from abmll.export import export_peft
    from abmll.models import load_base_model

    support_file = world["data"] / "h0" / "h0_4_1_train.jsonl"
    test_file = world["data"] / "h0" / "h0_test.jsonl"
    prior, saved = load_adapter_folder(world["prior"])
    base, tok = load_base_model(saved["model"]["model"])
    model = BayesLoraModel(base, from_dict(saved, "lora"))
    scoring, meta = from_dict(saved, "scoring"), from_dict(saved, "meta")
    support = make_batches(tok, read_jsonl(support_file), scoring)
    posterior, nll = adapt(model, prior, support, steps=2, lr=meta.inner_lr, beta=meta.beta)
    probs, labels = predict_batches(model, posterior, make_batches(tok, read_jsonl(test_file), scoring), n_samples=2)
    export_peft(tmp_path / "posterior", posterior, {**saved, "kind": "posterior"}, model=model)
    assert len(nll) == 2 and probs.shape == (6, 2) and torch.allclose(probs.sum(1), torch.ones(6))
    reloaded, cfg = load_adapter_folder(tmp_path / "posterior")
    assert cfg["kind"] == "posterior" and all(torch.equal(reloaded[k], posterior[k]) for k in posterior)


BOM = "\ufeff"


def test_files_with_a_utf8_bom_are_read(world, tmp_path):
    """Task files, splits, task metadata, predict inputs, YAML configs and adapter configs
    saved by spreadsheet tools or editors that start them with a UTF-8 BOM."""
    import shutil

    from abmll.convert import read_jsonl_rows
    from abmll.data import load_split, task_meta

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    for path in [*data.rglob("*.jsonl"), *data.rglob("*.json")]:
        path.write_text(BOM + path.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_split("tiny", data) == {"train": ["t0", "t1"], "test": ["h0"]}
    assert task_meta("h0", data)["task_type"] == "classification"
    test_file = data / "h0" / "h0_test.jsonl"
    assert [e.input for e in read_jsonl(test_file)] == [e.input for e in read_jsonl(world["data"] / "h0" / "h0_test.jsonl")]
    assert read_jsonl_rows(test_file)[0]["task"] == "h0"

    prior = tmp_path / "prior"
    shutil.copytree(world["prior"], prior)
    config = prior / "abmll_config.json"
    config.write_text(BOM + config.read_text(encoding="utf-8"), encoding="utf-8")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(BOM + f"eval_samples: 0\ndata_dir: {data}\n", encoding="utf-8")
    unlabelled = tmp_path / "inputs.jsonl"
    record = json.loads(test_file.read_text(encoding="utf-8-sig").splitlines()[0])
    del record["output"]
    unlabelled.write_text(BOM + json.dumps(record) + "\n", encoding="utf-8")
    for inputs in (test_file, unlabelled):
        out = tmp_path / f"pred-{inputs.stem}"
        assert (
            main(["predict", "--config", str(run_file), "--adapter", str(prior), "--input", str(inputs), "--out", str(out)]) == 0
        )
        assert len((out / "predictions.jsonl").read_text().splitlines()) == len(
            read_jsonl(inputs, "classification") if inputs == test_file else [1]
        )


@pytest.mark.parametrize(
    "group,field,value", [("lora", "sampling", "bogus"), ("lora", "top_layers", -2), ("meta", "outer_update", "maml")]
)
def test_an_invalid_value_in_a_saved_config_names_the_file_and_the_field(world, tmp_path, capsys, group, field, value):
    import shutil

    prior = tmp_path / "prior"
    shutil.copytree(world["prior"], prior)
    config = prior / "abmll_config.json"
    saved = json.loads(config.read_text())
    saved[group][field] = value
    config.write_text(json.dumps(saved))
    test_file = world["data"] / "h0" / "h0_test.jsonl"
    assert main(["predict", "--adapter", str(prior), "--input", str(test_file), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert str(config) in err and f"{group}.{field}" in err, err


def test_meta_train_validates_on_held_out_train_tasks_and_keeps_the_best_prior(world, tmp_path):
    out = tmp_path / "prior"
    assert (
        main(["meta-train", *cli_flags(config=world["config"], meta_steps="2", val_tasks="t1", validate_every="1", out=out)]) == 0
    )
    validation = json.loads((out / "validation.json").read_text())
    assert [v["step"] for v in validation] == [0, 1, 2]
    history = json.loads((out / "history.json").read_text())
    assert all(h["tasks"] == ["t0", "t0"] for h in history)  # t1 is held out of meta-training
    _, saved = load_adapter(out / "best")
    best = min(validation, key=lambda v: v["nll"])
    assert saved["meta_steps_done"] == best["step"] and saved["validation_nll"] == pytest.approx(best["nll"])
    assert (out / "validation_curve.png").read_bytes()[:8] == PNG
    # each saved prior's validation metrics, recomputed: adapted on t1's support (train file),
    # scored on its dev file, as a new task would be; the prior un-adapted scores otherwise
    for folder, step in ((out / "best", best["step"]), (out, 2)):
        cfg = RunConfig()
        model, tok, theta, _ = load_prior(str(folder), cfg)
        saved = json.loads((folder / "abmll_config.json").read_text())
        tasks, ev, meta = from_dict(saved, "tasks"), from_dict(saved, "eval"), cfg.meta
        ep = episode_batches(model, tok, "t1", 1, tasks, cfg.scoring, "dev", tasks.max_query)
        torch.manual_seed(1)  # the data seed seeds the episode's weight noise
        lr = ev.adapt_lr(meta)
        posterior, _ = adapt(model, theta, ep.support, ev.test_steps, lr, meta.beta, meta.n_samples, meta.inner_grad_clip)
        probs, labels = predict_batches(model, posterior, ep.query, ev.eval_samples)
        recorded = next(v for v in validation if v["step"] == step)
        nll = -probs[torch.arange(len(labels)), labels].log().mean().item()
        assert recorded["nll"] == pytest.approx(nll, abs=1e-5)
        metrics = compute_metrics(probs, labels)
        assert {k: recorded[k] for k in VAL_METRICS} == pytest.approx({k: metrics[k] for k in VAL_METRICS}, abs=1e-5)
        torch.manual_seed(1)
        unadapted, _ = predict_batches(model, theta, ep.query, ev.eval_samples)
        assert abs(-unadapted[torch.arange(len(labels)), labels].log().mean().item() - nll) > 1e-3


def test_demo_replaces_its_own_previous_run(world, tmp_path, monkeypatch):
    """README: "make demo replaces its own previous run": a second `abmll demo --out X` (no
    --overwrite given) runs, and nothing of the first run stays beside the new one (here: the
    first validated and plotted, the second does neither); other files in X are kept."""
    from abmll import cli

    monkeypatch.setattr(cli, "DEMO_CONFIG", world["config"])  # the tiny model and data, not SmolLM2
    out = tmp_path / "demo"
    first = ["--meta_steps", "1", "--val_tasks", "t1", "--validate_every", "1", "--max_test", "2", "--max_query", "2"]
    assert main(["demo", *first, "--eval_samples", "1", "--out", str(out)]) == 0
    stale = ["best", "validation.json", "validation_curve.png", "training_curves.png"]
    stale += ["reliability_zero_shot.png", "reliability_abmll.png"]
    assert all((out / name).exists() for name in stale)
    (out / "notes.txt").write_text("mine")
    assert (
        main(["demo", "--meta_steps", "2", "--eval_samples", "1", "--max_test", "2", "--plots", "false", "--out", str(out)]) == 0
    )
    assert [name for name in stale if (out / name).exists()] == []
    assert (out / "notes.txt").read_text() == "mine"
    _, saved = load_adapter(out)
    assert saved["meta_steps_done"] == 2 and len(json.loads((out / "history.json").read_text())) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["meta"]["meta_steps"] == 2 and results["config"]["tasks"]["val_tasks"] == []


def test_shipped_priors_are_taken_by_short_name_and_compared_in_evaluate(world, tmp_path, monkeypatch, capsys):
    import shutil

    from abmll import priors

    shipped = tmp_path / "shipped"
    shutil.copytree(world["prior"], shipped / "tiny-rule")
    monkeypatch.setattr(priors, "SHIPPED_DIR", shipped)
    assert priors.shipped_priors() == ["tiny-rule"]
    test_file = world["data"] / "h0" / "h0_test.jsonl"
    by_name, by_path = tmp_path / "by-name", tmp_path / "by-path"
    for adapter, out in (("tiny-rule", by_name), (str(world["prior"]), by_path)):
        assert main(["predict", "--adapter", adapter, "--input", str(test_file), "--eval_samples", "0", "--out", str(out)]) == 0
    named, pathed = ([json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()] for d in (by_name, by_path))
    assert [r["prediction"] for r in named] == [r["prediction"] for r in pathed]  # to rounding: BLAS sums vary with load
    torch.testing.assert_close(torch.tensor([r["probs"] for r in named]), torch.tensor([r["probs"] for r in pathed]))
    assert main(["predict", "--adapter", "no-such-prior", "--input", str(test_file), "--out", str(tmp_path / "x")]) == 1
    assert "shipped: tiny-rule" in capsys.readouterr().err

    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                *cli_flags(config=world["config"], prior=world["prior"], compare_priors="tiny-rule", plots="false", out=out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"zero_shot", "abmll", "prior:tiny-rule"}
    assert res["methods"]["prior:tiny-rule"]["mean"] == pytest.approx(res["methods"]["abmll"]["mean"], rel=1e-5)  # same prior


@pytest.mark.parametrize("verbose", [False, True])
def test_a_warning_never_shares_a_line_with_a_progress_bar(verbose, capsys, monkeypatch):
    """A warning issued while a bar is on screen (evaluate's truncation warning during the
    demo's bar) is printed on a line of its own and the bar is redrawn after it; the
    warnings hook in place before the command is back afterwards."""
    import re
    import warnings

    from tqdm.auto import tqdm

    from abmll.quiet import library_output

    def to_stderr(message, category, filename, lineno, file=None, line=None):  # the interpreter's own
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", to_stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with library_output(verbose):
            bar = tqdm(total=3, desc="evaluate", unit="run", file=sys.stderr, mininterval=0)
            bar.update(1)
            warnings.warn("task-x: 3 of 8 inputs cut", UserWarning, stacklevel=1)
            bar.update(1)
            bar.close()
    assert warnings.showwarning is to_stderr
    segments = re.split(r"[\r\n]", capsys.readouterr().err)
    (warned,) = [s for s in segments if "UserWarning: task-x" in s]
    assert "evaluate" not in warned and "1/3" not in warned, warned
    after = segments[segments.index(warned) + 1 :]
    assert any("evaluate" in s and "1/3" in s for s in after), after  # redrawn below the warning


def test_library_warnings_and_loading_bars_are_hidden_unless_verbose(world, tmp_path, capsys):
    """The libraries' FutureWarnings and transformers' weight-loading bar show only with
    --verbose; abmll's own warnings show either way; the libraries' settings are restored."""
    import warnings

    from transformers.utils import logging as hf_logging

    test_file = world["data"] / "h0" / "h0_test.jsonl"
    seen = {}
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.warn("a library's notice", FutureWarning, stacklevel=1)  # outside the command: shown
            assert (
                main(
                    [
                        "predict",
                        "--adapter",
                        str(world["prior"]),
                        "--input",
                        str(test_file),
                        "--out",
                        str(tmp_path / f"p{verbose}"),
                        *(["--verbose"] if verbose else []),
                    ]
                )
                == 0
            )
        seen[verbose] = ([w for w in caught if issubclass(w.category, FutureWarning)], capsys.readouterr().err)
    quiet, loud = seen[False], seen[True]
    assert len(quiet[0]) == 1 and len(loud[0]) > 1, (quiet[0], loud[0])
    assert "Loading weights" not in quiet[1] and "Loading weights" in loud[1]
    assert hf_logging.is_progress_bar_enabled()


def test_channel_and_demonstrations_run_through_adapt_and_predict(world, tmp_path, capsys):
    """--channel and --demonstrations are flags of adapt (saved with the posterior) and
    predict; predict takes the demonstrations from --support and refuses to run without it;
    its probabilities are recomputed with the library from the same support."""
    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    test_file = world["data"] / "h0" / "h0_test.jsonl"
    post = tmp_path / "post"
    flags = ["--channel", "true", "--demonstrations", "2"]
    assert main(["adapt", "--prior", str(world["prior"]), "--support", str(support), *flags, "--out", str(post)]) == 0
    saved = json.loads((post / "abmll_config.json").read_text())
    assert saved["scoring"]["channel"] is True and saved["scoring"]["demonstrations"] == 2
    no_support = ["predict", "--adapter", str(post), "--input", str(test_file), "--eval_samples", "0"]
    with pytest.raises(SystemExit, match="--support"):
        main([*no_support, "--out", str(tmp_path / "p0")])
    assert main([*no_support, "--support", str(support), "--out", str(tmp_path / "p")]) == 0
    record = json.loads((tmp_path / "p" / "predict_config.json").read_text())
    assert record["complete"] and record["support"] == str(support)
    written = torch.tensor([json.loads(line)["probs"] for line in (tmp_path / "p" / "predictions.jsonl").open()])
    cfg = RunConfig()
    model, tok, posterior, _ = load_prior(str(post), cfg)
    assert cfg.scoring.channel and cfg.scoring.demonstrations == 2
    batches = make_batches(tok, read_jsonl(test_file), cfg.scoring, read_jsonl(support))
    assert all(b.demonstrations.min() > 0 for b in batches)
    probs, _ = predict_batches(model, posterior, batches, 0)
    torch.testing.assert_close(written, probs, atol=1e-5, rtol=1e-5)


def test_a_prior_carries_its_adaptation_recipe_and_flags_override_it(world, tmp_path, capsys):
    """A prior whose abmll_config.json records an adaptation recipe (``eval``: as
    benchmarks/ship_prior.py writes it for a shipped prior) is adapted with it by default; a
    flag overrides one field and keeps the others."""
    import shutil

    prior = tmp_path / "prior"
    shutil.copytree(world["prior"], prior)
    config = json.loads((prior / "abmll_config.json").read_text())
    config["eval"] = {"test_optimizer": "adamw", "test_steps": 4, "test_lr": 0.02}
    (prior / "abmll_config.json").write_text(json.dumps(config))
    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    assert main(["adapt", "--prior", str(prior), "--support", str(support), "--out", str(tmp_path / "a")]) == 0
    assert "adapting with 4 adamw steps at lr 0.02" in capsys.readouterr().out
    posterior, saved = load_adapter_folder(tmp_path / "a")
    assert (saved["eval"]["test_optimizer"], saved["eval"]["test_steps"], saved["eval"]["test_lr"]) == ("adamw", 4, 0.02)
    cfg = RunConfig()
    model, tok, theta, _ = load_prior(str(prior), cfg)
    torch.manual_seed(cfg.meta.seed)
    batches = make_batches(tok, read_jsonl(support), cfg.scoring)
    meta = cfg.meta
    expected, _ = adapt(model, theta, batches, 4, 0.02, meta.beta, meta.n_samples, meta.inner_grad_clip, "adamw")
    for k in expected:
        torch.testing.assert_close(posterior[k], expected[k], rtol=1e-5, atol=1e-7)
    flags = ["--test_steps", "1", "--out", str(tmp_path / "b")]
    assert main(["adapt", "--prior", str(prior), "--support", str(support), *flags]) == 0
    saved = load_adapter_folder(tmp_path / "b")[1]["eval"]
    assert (saved["test_optimizer"], saved["test_steps"], saved["test_lr"]) == ("adamw", 1, 0.02)


def test_the_shipped_prior_carries_the_recipe_it_was_chosen_with():
    from abmll.priors import resolve_adapter

    folder = resolve_adapter("smollm2-135m-class_to_class")
    config = json.loads((folder / "abmll_config.json").read_text())
    record = json.loads((folder / "record.json").read_text())
    assert config["eval"] == record["adaptation"] == {"test_optimizer": "adamw", "test_steps": 10, "test_lr": 0.01}
    assert "abmll=adamw:10:0.01" in record["command"]  # the recipe its benchmark adapted it with
