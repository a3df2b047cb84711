"""benchmarks/quality.py on a tiny model and tiny data: the --quick smoke run writes the JSON
(required shape, finite floats), the Markdown table and one PNG per method; per-task chance and
majority-class rates; resuming from the cache; the dev-data sweep table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import bench_flags
import bench_tasks
import harness
import pytest
import quality
import torch
import tune_adaptation
import tune_outer
from conftest import cli_flags

import abmll.evaluate
from abmll.methods import METHODS
from abmll.metrics import compute_metrics
from abmll.temperature import apply_temperature, fit_temperature

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # other jobs share the 2 cores


def args(tiny_model_dir, tiny_data_dir, tmp_path, *extra):
    flags = cli_flags(model=tiny_model_dir, data_dir=tiny_data_dir, split="tiny", k=4, seeds=[1, 2], data_seeds=[1, 2])
    return ["--quick", *flags, *cli_flags(max_test=6, out_dir=tmp_path / "out", work_dir=tmp_path / "work"), *extra]


def finite_floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from finite_floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from finite_floats(v)


def test_quick_run_writes_json_table_and_plots(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    quality.main(args(tiny_model_dir, tiny_data_dir, tmp_path, "--val_tasks", "t3", "--val_seeds", "1", "2"))
    out = tmp_path / "out"
    res = json.loads((out / "quality-tiny.json").read_text())
    # a temperature fitted on dev data sees the meta-validation task's dev file only, never a test task
    dev = json.loads((tmp_path / "work" / "dev-cache.json").read_text())["results"]
    assert sorted(k.split("|")[:3] for k in dev) == sorted(
        [b, "t3", s] for b in ("lora", "multitask_lora", "abmll") for s in ("1", "2")
    )
    for base in ("lora", "multitask_lora", "abmll"):
        fit = res["dev_temperatures"][base]
        probs = torch.cat([torch.tensor(e["probs"]) for k, e in dev.items() if k.startswith(base + "|")])
        labels = torch.cat([torch.tensor(e["labels"]) for k, e in dev.items() if k.startswith(base + "|")])
        assert fit["temperature"] == pytest.approx(fit_temperature(probs, labels)) and fit["nll_after"] <= fit["nll_before"]
    assert {"model", "split", "seeds", "tasks", "command", "methods"} <= res.keys()
    assert res["split"] == "tiny" and res["seeds"] == [1, 2] and res["tasks"] == ["h0", "h1"]
    assert res["model"] == str(tiny_model_dir) and res["command"].startswith(".venv/bin/python benchmarks/quality.py")
    assert set(res["methods"]) == set(METHODS)
    assert res["train_tasks"] == ["t0", "t1", "t2"]  # --quick caps at 3
    labels = [json.loads(line)["output"] for line in (tiny_data_dir / "h0" / "h0_test.jsonl").read_text().splitlines()]
    share = max(labels.count("yes"), labels.count("no")) / len(labels)
    cached = {}  # (method, task, seed) -> the predictions kept in the benchmark's cache
    for key, entry in json.loads((tmp_path / "work" / "cache.json").read_text())["results"].items():
        method, task, seed, _ = key.split("|")
        cached[method, task, seed] = (torch.tensor(entry["probs"]), torch.tensor(entry["labels"]))
    assert sorted(cached) == sorted((m, t, s) for m in METHODS for t in ("h0", "h1") for s in ("1", "2"))
    for name, m in res["methods"].items():
        for key in ("accuracy", "macro_f1", "ece", "nll", "brier", "accuracy_std", "ece_std"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key)
        assert set(m["per_task"]) == {"h0", "h1"}
        row = m["per_task"]["h0"]
        assert row["chance_rate"] == 0.5 and row["majority_rate"] == pytest.approx(share)
        assert set(row["seeds"]) == {"1", "2"}
        for task, t_row in m["per_task"].items():  # each seed's metrics are those of its cached predictions
            for seed, reported in t_row["seeds"].items():
                probs, y = cached[name, task, seed]
                metrics = compute_metrics(probs, y)
                assert {k: reported[k] for k in metrics} == pytest.approx(metrics, abs=1e-9), (name, task, seed)
                assert reported["accuracy"] == pytest.approx((probs.argmax(-1) == y).float().mean().item())
                assert reported["n_predicted_classes"] == len(set(probs.argmax(-1).tolist()))
            for key in ("accuracy", "ece", "nll"):  # per task: mean over seeds; overall: mean over tasks
                assert t_row[key] == pytest.approx((t_row["seeds"]["1"][key] + t_row["seeds"]["2"][key]) / 2)
        for key in ("accuracy", "ece", "nll"):
            assert m[key] == pytest.approx((m["per_task"]["h0"][key] + m["per_task"]["h1"][key]) / 2)
    assert all(math.isfinite(x) for x in finite_floats(res["methods"]))
    for name, spec in METHODS.items():  # a tempered method: its base's cached predictions, tempered
        for task, seed in (("h0", "1"), ("h1", "2")):
            if spec.calibrate:
                entry = json.loads((tmp_path / "work" / "cache.json").read_text())["results"]
                mine = next(e for k, e in entry.items() if k.startswith(f"{name}|{task}|{seed}|"))
                base = cached[spec.base, task, seed][0]
                if spec.calibrate == "dev":
                    assert mine["metrics"]["temperature"] == res["dev_temperatures"][spec.base]["temperature"]
                torch.testing.assert_close(cached[name, task, seed][0], apply_temperature(base, mine["metrics"]["temperature"]))
    stats = res["task_stats"]["h0"]
    assert stats["majority_rate"] == pytest.approx(share) and stats["chance_rate"] == 0.5
    assert stats["majority_macro_f1"] == pytest.approx(2 * share / (1 + share) / len(set(labels)))
    support = sum(len((tiny_data_dir / "h0" / f"h0_4_{s}_train.jsonl").read_text().splitlines()) for s in (1, 2))
    assert stats["truncation"]["examples"] == support + 2 * len(labels)  # support and query inputs of both seeds
    assert set(res["target"]["vs"]) == set(METHODS) - {"abmll"}
    assert res["ece_scheme"]["binning"] == "equal_width" and res["ece_scheme"]["n_bins"] == 15
    for name, m in res["methods"].items():
        for key in ("accuracy", "macro_f1", "ece", "nll", "brier"):
            lo, hi = m[f"{key}_ci95"]
            assert lo <= m[key] + 1e-12 and m[key] <= hi + 1e-12, (name, key)
    # the paired differences are ABMLL minus each baseline, unit by unit; their mean is the difference of means
    for name, d in res["paired_abmll_minus"].items():
        for key in ("accuracy", "ece"):
            assert d[key]["diff"] == pytest.approx(res["methods"]["abmll"][key] - res["methods"][name][key], abs=1e-9)
    table = (out / "quality-tiny.md").read_text()
    assert "| method | accuracy | macro-F1 | ECE | NLL | Brier | AURC |" in table and "## Paired differences" in table
    assert "Partial" not in table and "| chance | majority F1 |" in table
    for name in METHODS:
        assert f"| {name} |" in table
        assert (out / "quality-tiny" / f"reliability_{name}.png").read_bytes()[:8] == PNG
    assert (out / "quality-tiny" / "risk_coverage.png").read_bytes()[:8] == PNG
    assert "macro-F1" in capsys.readouterr().out


def test_rerun_reads_the_cache_and_computes_only_what_is_missing(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    first = quality.main(args(tiny_model_dir, tiny_data_dir, tmp_path, "--methods", "zero_shot", "lora", "abmll", "--seeds", "1"))
    calls = []
    real = abmll.evaluate.run_method
    monkeypatch.setattr(
        abmll.evaluate,
        "run_method",
        lambda model, m, ep, meta, seed: calls.append((m.name, ep.task, seed)) or real(model, m, ep, meta, seed),
    )
    again = quality.main(args(tiny_model_dir, tiny_data_dir, tmp_path, "--methods", "zero_shot", "lora", "abmll", "--seeds", "1"))
    assert calls == [] and again["methods"] == first["methods"]
    more = quality.main(args(tiny_model_dir, tiny_data_dir, tmp_path, "--methods", "lora", "abmll", "--seeds", "1", "2"))
    assert sorted(calls) == sorted((m, t, 2) for m in ("lora", "abmll") for t in ("h0", "h1"))
    assert more["methods"]["abmll"]["per_task"]["h0"]["seeds"]["1"] == first["methods"]["abmll"]["per_task"]["h0"]["seeds"]["1"]
    calls.clear()  # a meta-training setting: only the methods of trained priors rerun
    quality.main(
        args(
            tiny_model_dir,
            tiny_data_dir,
            tmp_path,
            "--methods",
            "zero_shot",
            "lora",
            "abmll",
            "--seeds",
            "1",
            "--outer_lr",
            "0.01",
        )
    )
    assert sorted(calls) == [("abmll", "h0", 1), ("abmll", "h1", 1)]
    calls.clear()  # the adaptation budget: every method that adapts reruns
    quality.main(
        args(tiny_model_dir, tiny_data_dir, tmp_path, "--methods", "zero_shot", "lora", "--seeds", "1", "--test_steps", "3")
    )
    assert sorted(calls) == [("lora", "h0", 1), ("lora", "h1", 1)]
    assert len(list((tmp_path / "work").glob("prior-abmll-*"))) == 2  # one folder per prior config
    text = (tmp_path / "out" / "quality-tiny.md").read_text()  # the last run trained no prior
    assert "No prior is meta-trained in this run." in text and "Meta-training:" not in text


def test_dev_sweep_holds_dev_tasks_out_and_writes_the_table(tiny_model_dir, tiny_data_dir, tmp_path):
    out = quality.main(
        args(
            tiny_model_dir,
            tiny_data_dir,
            tmp_path,
            "--eval_split",
            "dev",
            "--test_tasks",
            "t0",
            "--methods",
            "bayes_lora",
            "abmll",
            "--sweep",
            "beta=0,1e-3",
            "--max_test",
            "4",
        )
    )
    assert out["field"] == "beta" and set(out["values"]) == {"0", "1e-3"}
    full = {raw: json.loads((tmp_path / "work" / f"sweep-beta-{raw}.json").read_text()) for raw in ("0", "1e-3")}
    for raw, row in out["values"].items():
        assert row["_tasks"] == ["t0"] and "t0" not in row["_train_tasks"]
        assert full[raw]["config"]["meta"]["beta"] == float(raw)  # the swept value was the one run
        for m in ("bayes_lora", "abmll"):  # each row is its run's, the mean over seeds of task t0
            seeds = full[raw]["methods"][m]["per_task"]["t0"]["seeds"]
            for key in ("accuracy", "ece", "nll"):
                assert row[m][key] == full[raw]["methods"][m][key]
                assert row[m][key] == pytest.approx(sum(r[key] for r in seeds.values()) / len(seeds))
    assert out["values"]["0"]["abmll"]["nll"] != out["values"]["1e-3"]["abmll"]["nll"]  # beta changed the result
    table = (tmp_path / "out" / "quality-tiny-dev-sweep-beta.md").read_text()
    assert "| beta | bayes_lora acc |" in table and "| 1e-3 |" in table


def test_per_method_adaptation_reruns_only_that_method_and_is_reported(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    base = args(tiny_model_dir, tiny_data_dir, tmp_path, "--methods", "zero_shot", "lora", "abmll", "--seeds", "1")
    first = quality.main(base)
    assert first["adaptation"] == {"lora": ["sgd", 2, 0.3], "abmll": ["sgd", 2, 0.3]}
    calls = []
    real = abmll.evaluate.run_method
    monkeypatch.setattr(
        abmll.evaluate,
        "run_method",
        lambda model, m, ep, meta, seed: calls.append((m.name, m.optimizer, m.steps, m.lr)) or real(model, m, ep, meta, seed),
    )
    out = quality.main([*base, "--adaptation", "lora=adamw:3:0.01"])
    assert sorted(set(calls)) == [("lora", "adamw", 3, 0.01)]  # abmll and zero-shot come from the cache
    assert out["adaptation"] == {"lora": ["adamw", 3, 0.01], "abmll": ["sgd", 2, 0.3]}
    assert out["methods"]["abmll"] == first["methods"]["abmll"] and out["methods"]["lora"] != first["methods"]["lora"]
    table = (tmp_path / "out" / "quality-tiny.md").read_text()
    assert "adaptation lora 3 AdamW steps at lr 0.01; abmll 2 SGD steps at lr 0.3;" in table


@pytest.mark.parametrize("bad", ["lora=adamw:3", "lora=adamw:x:0.1", "lora", "lora=adam:3:0.1", "abmll=sgd:2:0.3"])
def test_malformed_adaptation_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, bad):
    with pytest.raises(SystemExit, match="adaptation"):
        bench_flags.parse_bench(args(tiny_model_dir, tiny_data_dir, tmp_path, "--methods", "lora", "--adaptation", bad))


def test_tune_adaptation_tries_the_same_grid_for_every_method_on_dev_tasks(tiny_model_dir, tiny_data_dir, tmp_path):
    tune = tune_adaptation
    out = tune.main(
        args(
            tiny_model_dir,
            tiny_data_dir,
            tmp_path,
            "--methods",
            "lora",
            "abmll",
            "--val_tasks",
            "t0",
            "--seeds",
            "1",
            "--grid",
            "sgd:1:0.3",
            "adamw:2:0.01",
            "--test_k",
            "4",
        )
    )
    assert out["dev_tasks"] == ["t0"] and set(out["rows"]) == {"sgd:1:0.3", "adamw:2:0.01"}
    for method, point in out["chosen"].items():
        assert out["rows"][point][method]["nll"] == min(r[method]["nll"] for r in out["rows"].values())
    assert out["flags"] == "--adaptation " + " ".join(f"{m}={p}" for m, p in out["chosen"].items())
    assert "| adamw:2:0.01 |" in (tmp_path / "out" / "tune_adaptation-tiny.md").read_text()
    with pytest.raises(SystemExit, match="--val_tasks is required"):
        tune.main(args(tiny_model_dir, tiny_data_dir, tmp_path, "--methods", "lora"))


def test_tune_outer_trains_every_kind_at_every_grid_point_and_picks_the_lowest_validation_nll(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    flags = args(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path,
        "--val_tasks",
        "t0",
        "--val_seeds",
        "1",
        "--validate_every",
        "1",
        "--meta_steps",
        "2",
    )
    out = tune_outer.main([*flags, "--grid", "0.001:0:0", "0.01:2:0.5", "--kinds", "abmll", "reptile"])
    assert set(out["rows"]) == {"0.001:0:0", "0.01:2:0.5"} and out["val_tasks"] == ["t0"]
    for kind, point in out["chosen"].items():
        assert out["rows"][point][kind]["best_nll"] == min(r[kind]["best_nll"] for r in out["rows"].values())
    for point, rows in out["rows"].items():
        for row in rows.values():
            assert [s for s, _, _ in row["curve"]] == [0, 1, 2]
            assert row["best_nll"] == min(n for _, n, _ in row["curve"])
            saved = json.loads((Path(row["folder"]) / "abmll_config.json").read_text())["meta"]
            assert {f: saved[f] for f in ("outer_lr", "outer_warmup_steps", "outer_grad_clip")} == bench_flags.outer_point(point)
            history = json.loads((Path(row["folder"]) / "history.json").read_text())
            assert ("meta_grad_norm" in history[-1]) == (point == "0.01:2:0.5")
    # the test run (quality.py with the printed --outer flags) evaluates the chosen priors, not retrained
    assert out["flags"] == "--outer " + " ".join(f"{k}={p}" for k, p in out["chosen"].items())
    chosen = {k: Path(out["rows"][p][k]["folder"]) for k, p in out["chosen"].items()}
    stamp = {k: (f / "history.json").stat().st_mtime_ns for k, f in chosen.items()}
    res = quality.main([*flags, *out["flags"].split(), "--methods", "abmll", "reptile", "--seeds", "1"])
    assert {k: Path(res["priors"][k]["folder"]) for k in chosen} == chosen
    assert {k: (f / "history.json").stat().st_mtime_ns for k, f in chosen.items()} == stamp
    again = tune_outer.main([*flags, "--grid", "0.001:0:0", "0.01:2:0.5", "--kinds", "abmll", "reptile"])
    assert again["rows"] == out["rows"]  # resumed from the finished priors, not retrained
    assert {k: (f / "history.json").stat().st_mtime_ns for k, f in chosen.items()} == stamp
    assert "| 0.01:2:0.5 | reptile |" in (tmp_path / "out" / "tune_outer-tiny.md").read_text()
    with pytest.raises(SystemExit, match="LR:WARMUP:CLIP"):
        tune_outer.main([*flags, "--grid", "0.001:0"])
    with pytest.raises(SystemExit, match="--grid 0.001:0:-1: .*outer_grad_clip"):
        tune_outer.main([*flags, "--grid", "0.001:0:-1"])
    with pytest.raises(SystemExit, match="--outer takes KIND=LR:WARMUP:CLIP"):
        bench_flags.parse_bench([*flags, "--outer", "lora=0.001:0:0"])
    with pytest.raises(SystemExit, match="--outer abmll: .*outer_grad_clip"):
        bench_flags.parse_bench([*flags, "--outer", "abmll=0.001:0:-1"])
    with pytest.raises(SystemExit, match="--val_tasks and --validate_every are required"):
        tune_outer.main(args(tiny_model_dir, tiny_data_dir, tmp_path))


def test_smollm2_defaults_are_the_demo_settings_but_the_named_overrides():
    """One settings file for the demo and the benchmark: every demo.yaml setting is the
    benchmark's default unless it picks the demo's tasks or is a named override."""
    import yaml

    from abmll.config import DEMO_CONFIG

    bench, cfg = bench_flags.parse_bench([])
    defaults = {f: getattr(group, f) for group in cfg.groups().values() for f in vars(group)}
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    flat = {k: v for key, value in demo.items() if isinstance(value, dict) for k, v in value.items()}
    kept = {k: v for k, v in flat.items() if k not in bench_flags.DEMO_ONLY and k not in bench_flags.BENCHMARK_OVERRIDES}
    assert kept and all(defaults[k] == v for k, v in kept.items()), {k: (defaults[k], v) for k, v in kept.items()}
    assert cfg.eval.eval_samples == 4 and cfg.tasks.train_tasks == [] and cfg.tasks.data_seeds == [100, 13, 21, 42, 87]


def test_prior_key_covers_the_validators_adaptation_only_when_not_the_default(tiny_model_dir, tiny_data_dir, tmp_path):
    base = args(tiny_model_dir, tiny_data_dir, tmp_path, "--validate_every", "1", "--val_tasks", "t0")
    bench, cfg = bench_flags.parse_bench(base)
    default = harness.prior_config("abmll", cfg, ["t1"], bench)["validation"]
    assert "test_optimizer" not in default and "test_lr" not in default  # keys of priors saved before hold
    bench, cfg = bench_flags.parse_bench([*base, "--test_optimizer", "adamw", "--test_lr", "0.01"])
    other = harness.prior_config("abmll", cfg, ["t1"], bench)["validation"]
    assert other["test_optimizer"] == "adamw" and other["test_lr"] == 0.01


@pytest.mark.parametrize("max_length", [64, 16])
def test_task_stats_count_the_support_and_query_inputs_cut_to_fit_max_length(tiny_model_dir, tiny_data_dir, tmp_path, max_length):
    """Every input of the tiny tasks fits in 64 tokens and none fits in 16 (prompt plus option):
    the per-task record counts none, then all, of both seeds' support and query inputs, and
    the table's sentence names the cut task."""
    from transformers import AutoTokenizer

    bench, cfg = bench_flags.parse_bench(args(tiny_model_dir, tiny_data_dir, tmp_path, "--max_length", str(max_length)))[:2]
    stats = bench_tasks.task_stats("h0", [1, 2], bench, cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    cut, all_cut = stats["truncation"], max_length == 16
    assert cut["examples"] == 2 * (4 + 6)  # 2 seeds x (k = 4 support + 6 test inputs)
    assert cut["truncated"] == (cut["examples"] if all_cut else 0)
    assert (0 < cut["mean_dropped_fraction"] < 1) == all_cut
    line = quality.truncation_line({"h0": stats}, max_length)
    assert ("h0 20 of 20" in line) == all_cut and line.startswith("No ") == (not all_cut), line
