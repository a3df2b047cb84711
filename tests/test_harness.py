"""The benchmark harness (benchmarks/harness.py) and the entries of the benchmark scripts."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import bench_report
import harness
import pytest

SCRIPTS = [
    "compare_runs",
    "efficiency",
    "memory_soak",
    "ood",
    "prior_grid",
    "quality",
    "sampling",
    "scaling",
    "ship_prior",
    "top_layers",
    "tune_adaptation",
    "tune_outer",
    "tune_dev",
]


def test_cache_round_trips_and_keys_results_by_config(tmp_path):
    path = tmp_path / "cache.json"
    cache = harness.Cache(path, {"lora": {"lr": 0.1}, "abmll": {"lr": 0.1, "prior": "p"}})
    cache.put("lora", "task", 13, {"probs": [[0.5, 0.5]]})
    assert cache.get("lora", "task", 13) == {"probs": [[0.5, 0.5]]}
    assert cache.get("abmll", "task", 13) is None and cache.get("lora", "task", 21) is None

    again = harness.Cache(path, {"lora": {"lr": 0.1}})  # read back from disk
    assert again.get("lora", "task", 13) == {"probs": [[0.5, 0.5]]}
    changed = harness.Cache(path, {"lora": {"lr": 0.3}})  # another setting: not reused
    assert changed.get("lora", "task", 13) is None
    assert harness.Cache(path, {"lora": {"lr": 0.1}}, fresh=True).get("lora", "task", 13) is None
    assert harness.config_hash({"a": 1, "b": [2]}) == harness.config_hash({"b": [2], "a": 1})


def test_a_damaged_cache_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text('{"results": {"lora|t|1|x": ')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a benchmark cache")):
        harness.Cache(path, {"lora": {}})
    path.write_text("[]")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a benchmark cache")):
        harness.Cache(path, {"lora": {}})


def test_results_are_written_as_json_and_markdown_with_their_command(tmp_path):
    command = bench_report.command_line("quality.py", ["--split", "class_to_class", "--template", "{input} x"])
    assert command == ".venv/bin/python benchmarks/quality.py --split class_to_class --template '{input} x'"
    assert bench_report.command_line("ood.py", []) == ".venv/bin/python benchmarks/ood.py"
    bench_report.write_results("demo", {"command": command, "x": [1.5]}, "| a |\n|---|\n\n", tmp_path)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"command": command, "x": [1.5]}
    assert (tmp_path / "demo.md").read_text() == "| a |\n|---|\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_and_names_the_nearest_flag(script, capsys):
    module = importlib.import_module(script)
    argv = ["--help"]
    with pytest.raises(SystemExit) as done:
        module.main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    if script == "ood":  # takes abmll evaluate's flags as well as its own
        assert "--pairs" in out and "--test_steps" in out
    else:
        assert f"benchmarks/{script}.py" in out
    flags = [a.split()[0] for a in out.split("\n  --")[1:]] or ["help"]  # tune_dev has only -h, --help
    with pytest.raises(SystemExit) as done:
        module.main([f"--{flags[0]}x"])
    assert f"unknown flag --{flags[0]}x; did you mean --{flags[0]}" in str(done.value.code)


def test_rerunning_efficiency_keeps_the_top_layers_rows_in_efficiency_results(tmp_path, monkeypatch):
    """benchmarks/efficiency.py rewrites efficiency.{json,md}; the all-layer vs top-L rows that
    benchmarks/top_layers.py merged into them come back, once, after each rewrite."""
    import efficiency
    import top_layers

    committed = json.loads((bench_report.RESULTS / "efficiency.json").read_text())
    rows = committed.pop("top_layers_equal_wall_time")
    (tmp_path / "efficiency-top_layers.json").write_text(json.dumps(rows))
    monkeypatch.setattr(efficiency, "RESULTS", tmp_path)
    monkeypatch.setattr(top_layers, "RESULTS", tmp_path)
    for _ in range(2):
        efficiency.write("efficiency", committed)
        assert json.loads((tmp_path / "efficiency.json").read_text()) == {**committed, "top_layers_equal_wall_time": rows}
        text = (tmp_path / "efficiency.md").read_text()
        assert text.startswith(efficiency.table(committed).rstrip()) and text.count(top_layers.MARK) == 1
        assert "Top-L cached vs all-layer" in text
    efficiency.write("efficiency-tagged", committed)  # a tagged run is a file of its own
    assert "top_layers_equal_wall_time" not in json.loads((tmp_path / "efficiency-tagged.json").read_text())


def test_ood_results_are_recomputed_when_the_prior_under_the_same_name_changes(world, tmp_path, monkeypatch):
    """benchmarks/ood.py caches each (method, pair, seed) result. A rerun reuses them; a prior
    replaced in place (as a shipped prior is, under its name) recomputes ABMLL's, never the
    methods that do not start from it."""
    import shutil

    import ood

    from abmll.checkpoint import load_adapter, save_adapter

    prior = tmp_path / "prior"
    shutil.copytree(world["prior"], prior)
    monkeypatch.chdir(tmp_path)  # the cache goes to runs/ood/ under the working folder
    monkeypatch.setattr(ood, "write_results", lambda *a, **k: None)  # not the committed results
    argv = ["--config", str(world["config"]), "--top_layers", "0", "--max_test", "6", "--eval_samples", "2"]
    argv += ["--prior", str(prior), "--pairs", "h0:t0", "--seeds", "1"]

    def cached():
        return json.loads((tmp_path / "runs" / "ood" / "cache.json").read_text())

    first = ood.main(argv)
    assert len(cached()) == 3  # lora, bayes_lora, abmll
    assert ood.main(argv)["methods"] == first["methods"] and len(cached()) == 3

    tensors, config = load_adapter(prior)
    save_adapter(prior, {k: v + 0.5 if "lora_" in k else v for k, v in tensors.items()}, config)
    again = ood.main(argv)
    assert len(cached()) == 4  # only abmll's result is new
    assert again["methods"]["lora"] == first["methods"]["lora"]
    assert again["methods"]["abmll"] != first["methods"]["abmll"]


def test_compare_runs_pairs_evaluate_runs_by_task_and_seed(tmp_path):
    """benchmarks/compare_runs.py: each run's means and the paired difference from the first,
    equal to the difference of the means (closed form), with the setting the runs differ in
    named; runs over different (task, seed) units are refused naming them."""
    import compare_runs

    def run(name, samples, acc, method="abmll"):  # acc: {(task, seed): accuracy}
        per_task = {}
        for (t, s), a in acc.items():
            per_task.setdefault(t, {"seeds": {}})["seeds"][s] = {"accuracy": a, "ece": 1 - a}
        folder = tmp_path / name
        folder.mkdir()
        config = {"eval": {"eval_samples": samples, "max_test": 8}, "tasks": {"k": 16}}
        (folder / "results.json").write_text(json.dumps({"config": config, "methods": {method: {"per_task": per_task}}}))
        return str(folder)

    a = run("a", 4, {("t1", "1"): 0.5, ("t1", "2"): 0.7, ("t2", "1"): 0.6, ("t2", "2"): 0.8})
    b = run("b", 0, {("t1", "1"): 0.4, ("t1", "2"): 0.7, ("t2", "1"): 0.6, ("t2", "2"): 0.5})
    result = compare_runs.compare([a, b], "abmll")
    assert result["differ_in"] == ["eval.eval_samples"] and result["units"] == 4
    first, second = result["runs"]
    assert first["accuracy"]["mean"] == pytest.approx(0.65) and second["accuracy"]["mean"] == pytest.approx(0.55)
    diff = second["minus_first"]["accuracy"]
    assert diff["diff"] == pytest.approx(-0.1) and diff["ci95"][0] <= -0.1 <= diff["ci95"][1]
    assert second["minus_first"]["ece"]["diff"] == pytest.approx(0.1)
    assert "eval.eval_samples=0" in compare_runs.markdown(result, "cmd")
    assert "| four samples |" in compare_runs.markdown(result, "cmd", ["four samples", "mean"])
    with pytest.raises(SystemExit, match="--labels: 1 given for 2 runs"):
        compare_runs.markdown(result, "cmd", ["one"])
    # paired by (task, seed): a run lower by exactly 0.1 on every unit has a zero-width interval,
    # although its units spread 0.4-0.7 (an unpaired or misaligned comparison would be wide)
    shifted = run("s", 0, {("t1", "1"): 0.4, ("t1", "2"): 0.6, ("t2", "1"): 0.5, ("t2", "2"): 0.7})
    exact = compare_runs.compare([a, shifted], "abmll")["runs"][1]["minus_first"]["accuracy"]
    assert exact["diff"] == pytest.approx(-0.1) and exact["ci95"] == pytest.approx([-0.1, -0.1])

    recorded = json.loads((Path(a) / "results.json").read_text())
    recorded["config"]["eval"]["test_optimizer"] = "sgd"  # the default, which the other run leaves out
    (tmp_path / "a2.json").write_text(json.dumps(recorded))
    assert compare_runs.compare([str(tmp_path / "a2.json"), b], "abmll")["differ_in"] == ["eval.eval_samples"]
    as_file = compare_runs.compare([str(Path(a) / "results.json"), b], "abmll")  # a results file itself
    assert as_file["runs"][1]["minus_first"] == result["runs"][1]["minus_first"]
    lora = run("l", 4, {("t1", "1"): 0.5, ("t1", "2"): 0.7, ("t2", "1"): 0.6, ("t2", "2"): 0.8}, method="lora")
    crossed = compare_runs.compare([lora, f"{b}#abmll"], "lora")  # --method for the first, #METHOD for the second
    assert crossed["runs"][1]["minus_first"] == result["runs"][1]["minus_first"] and "method" in crossed["differ_in"]

    c = run("c", 0, {("t1", "1"): 0.4, ("t3", "1"): 0.7})
    with pytest.raises(SystemExit, match="different \\(task, seed\\) units"):
        compare_runs.compare([a, c], "abmll")
    with pytest.raises(SystemExit, match="no results of method 'lora'"):
        compare_runs.compare([a, b], "lora")


def test_prior_grid_reads_every_curve_kind_cuts_at_the_budget_and_chooses_the_lowest(tmp_path, monkeypatch):
    import prior_grid

    steps = [{"step": 0, "nll": 3.0, "ece": 0.5}, {"step": 50, "nll": 1.6, "ece": 0.3}, {"step": 100, "nll": 0.9}]
    record = {"validation": steps}
    curve = [{"step": 0, "nll": 3.0, "ece": 0.5}, {"step": 50, "nll": 1.5, "ece": 0.2}]
    tuned = {"rows": {"0.001:25:1.0": {"abmll": {"curve": [[0, 3.0, 0.5], [50, 1.7, 0.4]]}}}}
    short = [{"step": 0, "nll": 0.1, "ece": 0.1}]  # never reaches the budget: left out
    files = {}
    for name, data in {"record": record, "curve": curve, "tuned": tuned, "short": short}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(data))
    points = [f"{k}={v}" for k, v in files.items()]
    monkeypatch.setattr(prior_grid.bench_report, "write_results", lambda name, out, md: (tmp_path / f"{name}.md").write_text(md))
    out = prior_grid.main(["--max_step", "50", "--name", "g", "--points", *points])
    assert list(out["rows"]) == ["record", "curve", "tuned"]
    assert out["rows"]["record"]["best_nll"] == 1.6  # step 100's 0.9 is past the budget
    assert out["chosen"] == "curve" and out["rows"]["curve"]["best_ece"] == 0.2
    assert "| **curve** | 3.000 | 1.500 | 1.500 (50) | 0.200 |" in (tmp_path / "g.md").read_text()
