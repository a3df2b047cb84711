"""Nothing lost, nothing half-written, nothing silently wrong: finished runs are not
overwritten, inputs and outputs are checked before a model is loaded, results are written
as they finish and resumed, unfinished priors are flagged, invalid settings and degenerate
examples are refused naming the flag / line, truncation is reported, and Ctrl-C prints one
line. Interrupts are simulated by making a step raise KeyboardInterrupt."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings

import pytest
import torch
from conftest import cli_flags

import abmll.cli as cli
import abmll.commands.adapt as adapt_cmd
import abmll.commands.export as export_cmd
import abmll.commands.meta_train as meta_train_cmd
import abmll.commands.predict as predict_cmd
import abmll.evaluate as evaluate_mod
from abmll.checkpoint import CONFIG, TENSORS
from abmll.cli import main
from abmll.config import EvalArgs, TaskArgs, from_dict
from abmll.data import DataError, read_jsonl
from abmll.evaluate import Method, evaluate
from abmll.loading import load_prior
from abmll.scoring import ScoringConfig, make_batches


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs and outputs were checked")


def _forbid_model(monkeypatch):
    """Make every way a command builds or loads a model fail the test."""
    monkeypatch.setattr(meta_train_cmd, "build_model", _no_model)
    for module in (cli, adapt_cmd, predict_cmd, export_cmd):
        monkeypatch.setattr(module, "load_prior", _no_model)


def _raise_on_call(n: int, real):
    """A stand-in for ``real`` that raises KeyboardInterrupt on its n-th call."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    fake.calls = calls
    return fake


def _copy_prior(world, tmp_path, name="prior"):
    folder = tmp_path / name
    shutil.copytree(world["prior"], folder)
    return folder


# -- 1. a finished run is not overwritten -------------------------------------------------------


def test_meta_train_refuses_a_folder_that_holds_a_run(world, tmp_path, capsys, monkeypatch):
    folder = _copy_prior(world, tmp_path)
    (folder / "results.json").write_text("{}")
    (folder / "reliability_abmll.png").write_bytes(b"old")
    before = (folder / TENSORS).read_bytes()
    _forbid_model(monkeypatch)
    assert main(["meta-train", "--config", str(world["config"]), "--meta_steps", "1", "--out", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "already holds a run" in err
    assert (folder / TENSORS).read_bytes() == before
    monkeypatch.undo()
    assert main(["meta-train", "--config", str(world["config"]), "--meta_steps", "1", "--out", str(folder), "--overwrite"]) == 0
    assert not (folder / "results.json").exists() and not (folder / "reliability_abmll.png").exists()
    assert json.loads((folder / CONFIG).read_text())["meta_steps_done"] == 1
    assert main(["meta-train", "--out", str(folder), "--resume", "--overwrite"]) == 1  # contradictory


def test_adapt_and_export_refuse_to_replace_an_adapter_and_their_input(world, tmp_path, capsys, monkeypatch):
    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    post = tmp_path / "post"
    assert main(["adapt", "--prior", str(world["prior"]), "--support", str(support), "--out", str(post)]) == 0
    before = (post / "adapter_model.safetensors").read_bytes()
    _forbid_model(monkeypatch)
    for argv in (
        ["adapt", "--prior", str(world["prior"]), "--support", str(support), "--out", str(post)],
        ["export", "--adapter", str(world["prior"]), "--out", str(post)],
    ):
        assert main(argv) == 1
        assert "already holds an adapter" in capsys.readouterr().err
    assert main(["adapt", "--prior", str(world["prior"]), "--support", str(support), "--out", str(world["prior"])]) == 1
    assert "own folder" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", "--adapter", str(world["prior"]), "--out", str(tmp_path / "mine")]) == 1
    assert (post / "adapter_model.safetensors").read_bytes() == before
    monkeypatch.undo()
    assert (
        main(
            [
                "adapt",
                "--prior",
                str(world["prior"]),
                "--support",
                str(support),
                "--out",
                str(post),
                "--overwrite",
                "--test_steps",
                "2",
            ]
        )
        == 0
    )
    assert (post / "adapter_model.safetensors").read_bytes() != before


# -- 3. inputs and outputs checked before the model; results streamed and resumed -----------------


def test_inputs_and_output_folder_are_checked_before_the_model_is_loaded(world, tmp_path, capsys, monkeypatch):
    _forbid_model(monkeypatch)
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    shutil.copytree(data / "h0", data / "h1")
    for f in (data / "h1").iterdir():
        f.rename(f.with_name(f.name.replace("h0", "h1")))
    shutil.copy(data / "task_meta" / "h0.json", data / "task_meta" / "h1.json")
    test_file = data / "h1" / "h1_test.jsonl"
    lines = test_file.read_text().splitlines()
    lines[3] = lines[3].replace('"output": "', '"output": "nope')
    test_file.write_text("\n".join(lines) + "\n")
    assert (
        main(
            [
                "evaluate",
                *cli_flags(
                    config=world["config"], prior=world["prior"], data_dir=data, test_tasks=["h0", "h1"], out=tmp_path / "e"
                ),
            ]
        )
        == 1
    )
    assert f"{test_file}:4" in capsys.readouterr().err  # the second task's bad line, found up front

    dev = data / "t1" / "t1_4_1_dev.jsonl"
    dev.write_text(dev.read_text() + "{not json\n")
    assert main(["meta-train", "--config", str(world["config"]), "--data_dir", str(data), "--out", str(tmp_path / "m")]) == 1
    assert f"{dev}:5" in capsys.readouterr().err  # not when t1 is first sampled

    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert main(["predict", *cli_flags(adapter=world["prior"], input=data / "h0" / "h0_test.jsonl", out=locked / "p")]) == 1
        assert "cannot write" in capsys.readouterr().err
    finally:
        os.chmod(locked, 0o700)


def test_an_interrupted_predict_resumes_to_the_same_predictions(world, tmp_path, capsys, monkeypatch):
    test_file = world["data"] / "h0" / "h0_test.jsonl"
    args = ["predict", "--adapter", str(world["prior"]), "--input", str(test_file), "--eval_samples", "2", "--chunk_size", "2"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    reference = (tmp_path / "ref" / "predictions.jsonl").read_text()

    fake = _raise_on_call(3, predict_cmd.predict_samples)
    monkeypatch.setattr(predict_cmd, "predict_samples", fake)
    assert main(args + ["--out", str(tmp_path / "p")]) == 130
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bars: one line
    assert "Traceback" not in err and "4 finished result line(s)" in last and "resume" in last
    partial = json.loads((tmp_path / "p" / "predict_config.json").read_text())
    assert partial["complete"] is False
    assert (tmp_path / "p" / "predictions.jsonl").read_text() == "".join(reference.splitlines(True)[:4])
    monkeypatch.undo()
    calls = _raise_on_call(0, predict_cmd.predict_samples)
    monkeypatch.setattr(predict_cmd, "predict_samples", calls)
    assert main(args + ["--out", str(tmp_path / "p")]) == 0
    assert len(calls.calls) == 1  # only the last chunk of 6 was computed
    assert (tmp_path / "p" / "predictions.jsonl").read_text() == reference
    assert json.loads((tmp_path / "p" / "predict_config.json").read_text())["complete"] is True
    assert main(args + ["--out", str(tmp_path / "p")]) == 1  # finished: not replaced silently
    assert "--overwrite" in capsys.readouterr().err


def test_an_interrupted_evaluate_resumes_from_its_finished_results(world, tmp_path, capsys, monkeypatch):
    args = ["evaluate", *cli_flags(config=world["config"], prior=world["prior"], eval_samples="1", plots="false")]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    reference = json.loads((tmp_path / "ref" / "results.json").read_text())

    real = evaluate_mod.run_method
    monkeypatch.setattr(evaluate_mod, "run_method", _raise_on_call(2, real))
    assert main(args + ["--out", str(tmp_path / "e")]) == 130
    assert "1 finished result line(s)" in capsys.readouterr().err
    assert not (tmp_path / "e" / "results.json").exists()
    calls = _raise_on_call(0, real)
    monkeypatch.setattr(evaluate_mod, "run_method", calls)
    assert main(args + ["--out", str(tmp_path / "e")]) == 0
    assert len(calls.calls) == 1  # zero-shot was read back, abmll computed
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    # to rounding: the two runs' weight-noise forwards can sum in a different order (BLAS)
    for method, got in results["methods"].items():
        ref = reference["methods"][method]
        assert got["per_task"]["h0"]["seeds"]["1"] == pytest.approx(ref["per_task"]["h0"]["seeds"]["1"], rel=1e-5, abs=1e-7)
    assert results["methods"].keys() == reference["methods"].keys()
    assert not (tmp_path / "e" / "results.partial.jsonl").exists()
    assert main(args + ["--out", str(tmp_path / "e")]) == 1  # finished: not replaced silently


# -- 4. an unfinished prior is flagged ----------------------------------------------------------


def test_an_unfinished_prior_is_warned_about_and_recorded(world, tmp_path, capsys):
    folder = _copy_prior(world, tmp_path)
    config = json.loads((folder / CONFIG).read_text())
    config.update(meta_steps_done=1, run_meta_steps_done=1)  # 1 of its 2 meta-steps: interrupted
    (folder / CONFIG).write_text(json.dumps(config))
    assert (
        main(["evaluate", *cli_flags(config=world["config"], prior=folder, eval_samples="0", plots="false", out=tmp_path / "e")])
        == 0
    )
    assert "WARNING" in capsys.readouterr().err
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["prior_complete"] is False and results["prior"]["meta_steps_done"] == 1
    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    assert main(["adapt", "--prior", str(folder), "--support", str(support), "--out", str(tmp_path / "post")]) == 0
    assert json.loads((tmp_path / "post" / CONFIG).read_text())["prior_complete"] is False
    assert main(["predict", "--adapter", str(folder), "--input", str(support), "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "predict_config.json").read_text())["prior_complete"] is False
    capsys.readouterr()
    assert main(["predict", "--adapter", str(world["prior"]), "--input", str(support), "--out", str(tmp_path / "p2")]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert json.loads((tmp_path / "p2" / "predict_config.json").read_text())["prior_complete"] is True


# -- 5. invalid settings are refused when the config is built, naming the flag -----------------

INVALID = [
    ("--eval_samples", "-1"),
    ("--test_steps", "-1"),
    ("--inner_lr", "-1"),
    ("--inner_lr", "nan"),
    ("--rank", "0"),
    ("--alpha", "0"),
    ("--max_length", "0"),
    ("--k", "0"),
    ("--max_test", "0"),
    ("--template", "no input field"),
    ("--template", "{inputs}"),
    ("--max_rows", "0"),
    ("--init_std_factor", "inf"),
    ("--data_seeds", "1", "1"),
    ("--inner_lr", "1e39"),
    ("--seed", "99999999999999999999"),
    ("--init_seed", "-1"),
    ("--test_tasks", "h0", "h0"),
]


@pytest.mark.parametrize("flag", INVALID, ids=lambda f: " ".join(f))
def test_invalid_settings_are_refused_naming_the_flag(world, tmp_path, capsys, monkeypatch, flag):
    _forbid_model(monkeypatch)
    assert (
        main(["evaluate", "--config", str(world["config"]), "--prior", str(world["prior"]), "--out", str(tmp_path / "o"), *flag])
        == 1
    )
    err = capsys.readouterr().err
    assert flag[0] in err and err.count("\n") == 1, err


@pytest.mark.parametrize("entry", ["max_test: 4.5", "test_steps: 2.0", "eval_samples: true"])
def test_a_non_integer_from_a_config_file_is_refused_naming_the_flag(world, tmp_path, capsys, monkeypatch, entry):
    # values from YAML reach the configs unconverted (argparse converts only the flags)
    _forbid_model(monkeypatch)
    config = tmp_path / "c.yaml"  # the entry last in the eval group (a repeated key: the last wins)
    config.write_text(world["config"].read_text().replace("  max_test: 6\n", f"  max_test: 6\n  {entry}\n"))
    assert main(["evaluate", "--config", str(config), "--prior", str(world["prior"]), "--out", str(tmp_path / "o")]) == 1
    name = entry.split(":")[0]
    assert f"--{name} must be an integer" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused(world, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _forbid_model(monkeypatch)
    assert (
        main(
            [
                "predict",
                *cli_flags(adapter=world["prior"], input=world["data"] / "h0" / "h0_test.jsonl", device="cuda", out=tmp_path),
            ]
        )
        == 1
    )
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                *cli_flags(adapter=world["prior"], input=world["data"] / "h0" / "h0_test.jsonl", chunk_size="0", out=tmp_path),
            ]
        )
        == 1
    )
    assert "--chunk_size" in capsys.readouterr().err


# -- 6. truncation is warned about and recorded -------------------------------------------------


def test_truncated_inputs_are_counted_warned_and_recorded(world, tmp_path, capsys):
    model, tok, theta, _ = load_prior(str(world["prior"]))
    scoring = ScoringConfig(max_length=30, max_rows=8)
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    test_file = data / "h0" / "h0_test.jsonl"
    rows = [json.loads(x) for x in test_file.read_text().splitlines()]
    rows[0]["input"] = "abcdefgh " * 30
    test_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = read_jsonl(test_file)
    full = [len(tok(ex.input, add_special_tokens=False)["input_ids"]) for ex in examples]
    batches = make_batches(tok, examples, scoring)
    dropped = torch.zeros(len(examples), dtype=torch.long)
    fraction = torch.zeros(len(examples))
    for b in batches:
        dropped[b.example_index], fraction[b.example_index] = b.dropped_tokens, b.dropped_fraction
    assert dropped[0] > 0 and (dropped[1:] == 0).all()
    assert fraction[0].item() == pytest.approx(dropped[0].item() / full[0])

    tasks = TaskArgs(data_dir=str(data), k=4, data_seeds=[1], test_tasks=["h0"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = evaluate(
            model,
            tok,
            [Method("zero_shot", model.init_params(), 0, 0)],
            ["h0"],
            [1],
            tasks,
            scoring,
            from_dict({}, "meta"),
            EvalArgs(max_test=6),
        )
    record = results["truncation"]["h0"]
    assert record["truncated"] == 1 and record["examples"] == 4 + 6
    assert record["max_dropped_fraction"] == pytest.approx(fraction[0].item())
    assert any("h0: 1 of 10 inputs cut" in str(w.message) for w in caught)

    assert main(["predict", *cli_flags(adapter=world["prior"], input=test_file, max_length="30", out=tmp_path / "p")]) == 0
    assert "1 input(s) were cut" in capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert lines[0]["dropped_tokens"] == dropped[0].item() and lines[1]["dropped_tokens"] == 0


# -- 7. degenerate examples are refused ---------------------------------------------------------


@pytest.mark.parametrize(
    "options, output, message",
    [
        (["", "yes"], "yes", "empty or only whitespace"),
        (["  ", "yes"], "yes", "empty or only whitespace"),
        (["\u200b", "yes"], "yes", "invisible"),
        (["yes", "yes "], "yes", "differ only"),
        (["caf\u00e9", "cafe\u0301"], "caf\u00e9", "differ only"),
        (["yes"], "yes", "only one option"),
    ],
)
def test_degenerate_options_are_refused_with_the_line(tmp_path, options, output, message):
    path = tmp_path / "t.jsonl"
    good = {"task": "t", "input": "a", "output": "no", "options": ["no", "yes"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "options": options, "output": output}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        read_jsonl(path)


# -- 9. Ctrl-C: one line saying what was saved and how to resume ---------------------------------


def test_ctrl_c_in_meta_training_prints_one_line_and_the_run_resumes(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(meta_train_cmd.MetaTrainer, "step", _raise_on_call(3, meta_train_cmd.MetaTrainer.step))
    argv = ["meta-train", "--config", str(world["config"]), "--meta_steps", "4", "--save_every", "1", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "meta-step 2" in last and "--resume" in last and "Traceback" not in err
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert json.loads((out / CONFIG).read_text())["meta_steps_done"] == 4


# -- found by trying to break the above ---------------------------------------------------------


def test_evaluate_does_not_resume_over_edited_task_files(world, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    args = [
        "evaluate",
        *cli_flags(
            config=world["config"], prior=world["prior"], data_dir=data, eval_samples="1", plots="false", out=tmp_path / "e"
        ),
    ]
    real = evaluate_mod.run_method
    monkeypatch.setattr(evaluate_mod, "run_method", _raise_on_call(2, real))
    assert main(args) == 130
    test_file = data / "h0" / "h0_test.jsonl"
    test_file.write_text(
        test_file.read_text()
        .replace('"output": "yes"', '"output": "tmp"')
        .replace('"output": "no"', '"output": "yes"')
        .replace('"output": "tmp"', '"output": "no"')
    )
    monkeypatch.setattr(evaluate_mod, "run_method", real)
    capsys.readouterr()
    assert main(args) == 1
    assert "partial results of other settings" in capsys.readouterr().err


def test_an_interrupted_overwrite_resumes_and_leaves_no_stale_plots(world, tmp_path, monkeypatch):
    out = tmp_path / "e"
    base = ["evaluate", "--config", str(world["config"]), "--prior", str(world["prior"]), "--out", str(out)]
    assert main([*base, "--eval_samples", "1"]) == 0
    (out / "reliability_gone.png").write_bytes(b"old")
    real = evaluate_mod.run_method
    monkeypatch.setattr(evaluate_mod, "run_method", _raise_on_call(2, real))
    args = [*base, "--eval_samples", "2", "--plots", "false", "--overwrite"]
    assert main(args) == 130
    calls = _raise_on_call(0, real)
    monkeypatch.setattr(evaluate_mod, "run_method", calls)
    assert main(args) == 0 and len(calls.calls) == 1  # the same command resumed
    assert json.loads((out / "results.json").read_text())["config"]["eval"]["eval_samples"] == 2
    assert not list(out.glob("reliability_*.png"))


def test_predict_is_not_resumed_or_replaced_across_settings(world, tmp_path, capsys, monkeypatch):
    test_file = world["data"] / "h0" / "h0_test.jsonl"
    args = ["predict", *cli_flags(adapter=world["prior"], input=test_file, chunk_size="2", out=tmp_path / "p")]
    monkeypatch.setattr(predict_cmd, "predict_samples", _raise_on_call(2, predict_cmd.predict_samples))
    assert main(args) == 130
    monkeypatch.undo()
    assert main([*args, "--abstain_above", "0.1"]) == 1  # other settings: not mixed into the partial file
    assert "other settings" in capsys.readouterr().err
    assert main(args) == 0
    (tmp_path / "p" / "predict_config.json").unlink()  # finished predictions, their record lost
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_overwrite_never_deletes_other_files_and_keeps_the_folder(world, tmp_path, capsys):
    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    post = tmp_path / "post"
    assert main(["adapt", "--prior", str(world["prior"]), "--support", str(support), "--out", str(post)]) == 0
    (post / "notes.txt").write_text("mine")
    assert main(["adapt", "--prior", str(world["prior"]), "--support", str(support), "--out", str(post), "--overwrite"]) == 1
    assert (post / "notes.txt").read_text() == "mine" and "notes.txt" in capsys.readouterr().err
    (post / "notes.txt").unlink()
    os.chmod(post, 0o750)
    link = tmp_path / "link"
    link.symlink_to(post)
    assert (
        main(
            [
                "adapt",
                "--prior",
                str(world["prior"]),
                "--support",
                str(support),
                "--out",
                str(link),
                "--overwrite",
                "--test_steps",
                "2",
            ]
        )
        == 0
    )
    assert link.is_symlink() and (post / "adapter_model.safetensors").is_file()
    assert stat.S_IMODE(post.stat().st_mode) == 0o750
    run = tmp_path / "run"
    shutil.copytree(post, run)  # meta-train over an adapt output
    assert main(["meta-train", "--config", str(world["config"]), "--meta_steps", "1", "--out", str(run), "--overwrite"]) == 0
    assert not (run / "adapter_model.safetensors").exists() and (run / TENSORS).is_file()


def test_a_swap_interrupted_between_its_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    from abmll import checkpoint

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("old")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's rename
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.atomic_folder(tmp_path / "a") as tmp:
            (tmp / "x").write_text("new")
    monkeypatch.undo()
    assert (tmp_path / "a" / "x").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_unfinished_priors_are_flagged_through_posteriors_and_compared_priors(world, tmp_path, capsys):
    folder = _copy_prior(world, tmp_path, "unfinished")
    config = json.loads((folder / CONFIG).read_text())
    config.update(meta_steps_done=1, run_meta_steps_done=1)
    (folder / CONFIG).write_text(json.dumps(config))
    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    assert main(["adapt", "--prior", str(folder), "--support", str(support), "--out", str(tmp_path / "post")]) == 0
    capsys.readouterr()
    assert main(["predict", "--adapter", str(tmp_path / "post"), "--input", str(support), "--out", str(tmp_path / "p")]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert json.loads((tmp_path / "p" / "predict_config.json").read_text())["prior_complete"] is False
    assert (
        main(
            [
                "evaluate",
                *cli_flags(
                    config=world["config"],
                    prior=world["prior"],
                    eval_samples="0",
                    compare_priors=folder,
                    plots="false",
                    out=tmp_path / "e",
                ),
            ]
        )
        == 0
    )
    assert "WARNING" in capsys.readouterr().err
    flags = json.loads((tmp_path / "e" / "results.json").read_text())["priors_complete"]
    assert flags == {"abmll": True, "prior:unfinished": False}


def test_a_checkpoint_from_before_a_new_config_field_resumes():
    from abmll.config import EvalArgs, RunConfig
    from abmll.train import config_changes

    current = RunConfig(eval=EvalArgs()).to_dict()
    saved = json.loads(json.dumps(current))
    del saved["eval"]["ood_tasks"], saved["eval"]["compare_priors"]
    assert config_changes(saved, current) == []
    saved["eval"]["max_test"] = 3
    assert config_changes(saved, current) == ["eval.max_test: 3 -> 64"]


# -- damaged files on disk: checksums, and the previous training state kept -----------


def test_meta_train_resumes_from_the_previous_state_when_the_newest_is_damaged(world, tmp_path, capsys):
    """A flipped bit in the newest training state (step 3): --resume warns, continues from the
    previous state (step 2) and ends with the prior of an uninterrupted run; with both states
    damaged it refuses, naming both files, and writes nothing."""
    from test_checkpoint import flip_a_bit

    from abmll.checkpoint import load_adapter
    from abmll.train import CHECKPOINT_DIR
    from abmll.train_state import PREVIOUS_STATE, STATE

    out, full = tmp_path / "run", tmp_path / "full"
    argv = ["meta-train", "--config", str(world["config"]), "--save_every", "1", "--plots", "false"]
    torch.manual_seed(0)  # the adapter's initialisation draws from torch's global generator
    assert main([*argv, "--meta_steps", "3", "--out", str(out)]) == 0
    ckpt = out / CHECKPOINT_DIR
    newest, previous = ckpt / "state-00000003.safetensors", ckpt / "state-00000002.safetensors"
    assert {p.name for p in ckpt.iterdir()} == {STATE, PREVIOUS_STATE, newest.name, previous.name}
    flip_a_bit(newest)
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="resuming from the previous state") as caught:
        assert main([*argv, "--meta_steps", "4", "--out", str(out), "--resume"]) == 0
    (warning,) = [w for w in caught if "resuming from the previous state" in str(w.message)]
    assert str(warning.message).startswith(f"{newest}: damaged: its sha256")
    assert str(warning.message).endswith(f"resuming from the previous state {ckpt / PREVIOUS_STATE} (step 2) instead")
    assert f"resuming {out} after 2 meta-steps" in capsys.readouterr().out
    assert json.loads((out / CONFIG).read_text())["meta_steps_done"] == 4
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [0, 1, 2, 3]
    torch.manual_seed(0)
    assert main([*argv, "--meta_steps", "4", "--out", str(full)]) == 0
    resumed, reference = load_adapter(out)[0], load_adapter(full)[0]
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)  # steps 3 and 4 redone exactly
    assert {p.name for p in ckpt.iterdir()} == {STATE, PREVIOUS_STATE, "state-00000004.safetensors", newest.name}

    flip_a_bit(ckpt / "state-00000004.safetensors")
    newest.write_bytes(newest.read_bytes()[:-40])
    before = (out / TENSORS).read_bytes()
    assert main([*argv, "--meta_steps", "5", "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"no intact training state in {ckpt}" in err
    assert f"{ckpt / 'state-00000004.safetensors'}: damaged: its sha256" in err
    assert f"{newest}: not a readable safetensors file" in err and "start the run again" in err
    assert (out / TENSORS).read_bytes() == before


def test_adapt_and_predict_refuse_an_adapter_with_a_changed_byte(world, tmp_path, capsys):
    """A prior's adapter.safetensors or an export's adapter_model.safetensors with one bit
    flipped (still valid safetensors) is refused, naming the file and what to do."""
    from test_checkpoint import flip_a_bit

    support = world["data"] / "h0" / "h0_4_1_train.jsonl"
    prior = _copy_prior(world, tmp_path)
    flip_a_bit(prior / TENSORS)
    assert main(["adapt", "--prior", str(prior), "--support", str(support), "--out", str(tmp_path / "post")]) == 1
    err = capsys.readouterr().err
    assert f"{prior / TENSORS}: damaged: its sha256" in err and "save the adapter again" in err

    exported = tmp_path / "exported"
    assert main(["export", "--adapter", str(world["prior"]), "--out", str(exported)]) == 0
    flip_a_bit(exported / "adapter_model.safetensors")
    test_file = world["data"] / "h0" / "h0_test.jsonl"
    assert main(["predict", "--adapter", str(exported), "--input", str(test_file), "--out", str(tmp_path / "pred")]) == 1
    err = capsys.readouterr().err
    assert f"{exported / 'adapter_model.safetensors'}: damaged: its sha256" in err and "write the adapter again" in err
