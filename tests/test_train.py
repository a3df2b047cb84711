"""Meta-training reliability: exact resume (also after SIGKILL), non-finite steps, bad checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, tiny_cli

from abmll import meta, train
from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.checkpoint import CheckpointError, file_sha256, load_adapter
from abmll.cli import main
from abmll.config import TaskArgs
from abmll.gaussian_lora import HyperpriorConfig
from abmll.meta import MetaConfig, NonFiniteLossError
from abmll.scoring import ScoringConfig
from abmll.train import CHECKPOINT_DIR, MetaTrainer
from abmll.train_state import PREVIOUS_STATE, STATE, load_state

TASKS = ["t0", "t1", "t2", "t3"]
CONFIG = {"run": "test"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast and steady on a busy machine, and the same arithmetic as the
    subprocess of the SIGKILL test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(data_dir, meta_steps=6, model_seed=0, rank=2, log_support_after=False, **outer) -> MetaTrainer:
    """A trainer on the tiny random Llama; ``model_seed`` changes the adapter initialisation;
    ``outer``: more MetaConfig fields."""
    torch.manual_seed(model_seed)
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=rank))
    tasks = TaskArgs(data_dir=str(data_dir), k=4, data_seeds=[1, 2], max_query=4)
    config = MetaConfig(**{"meta_steps": meta_steps, "inner_steps": 1, "outer_lr": 0.05, "seed": 3, **outer})
    scoring = ScoringConfig(max_rows=8)
    return MetaTrainer(
        model, make_tiny_tokenizer(), TASKS, tasks, config, HyperpriorConfig(), scoring, log_support_after=log_support_after
    )


def thetas_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].detach(), b[k].detach()) for k in a)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_exact_second_order_rule_meta_trains_and_equals_first_order_without_inner_steps(tiny_data_dir):
    def trained(**outer):
        trainer = make_trainer(tiny_data_dir, meta_steps=2, n_samples=0, log_support_after=True, **outer)
        trainer.run(None, CONFIG)
        return trainer

    for k in (0, 1):
        first, exact = trained(inner_steps=k), trained(inner_steps=k, outer_update="second_order")
        assert all(math.isfinite(h["loss"]) and h["support_nll_before"] > 0 for h in exact.history)
        assert all(h["support_nll_after"] > 0 for h in exact.history)  # logged, not left at 0
        if k == 0:  # lambda = theta: the support NLL after is the one before
            assert all(h["support_nll_after"] == pytest.approx(h["support_nll_before"], rel=1e-5) for h in exact.history)
        gap = max((first.theta[n] - exact.theta[n]).abs().max().item() for n in first.theta)
        if k == 0:  # no inner step: lambda = theta, the straight-through gradient is exact
            assert gap < 1e-5
        else:  # one inner step: the first-order gradient is an approximation
            assert gap > 1e-5


# ---------------------------------------------------------------- exact resume, in process


@pytest.mark.parametrize("outer", [{}, {"outer_warmup_steps": 5, "outer_grad_clip": 0.05}], ids=["plain", "warmup_clip"])
def test_resume_continues_bit_exactly(tiny_data_dir, tmp_path, outer):
    full = make_trainer(tiny_data_dir, **outer)
    full.run(tmp_path / "a", CONFIG, save_every=3)  # saves after 3 and after 6 steps
    reference = make_trainer(tiny_data_dir, **outer)
    reference.run(None, CONFIG)
    assert thetas_equal(full.theta, reference.theta)  # saving does not disturb the run
    if outer:  # the warm-up reached outer_lr; the clip bound some steps
        assert full.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
        assert any(h["meta_grad_norm"] > 0.05 for h in full.history)

    partial = make_trainer(tiny_data_dir, meta_steps=3, **outer)
    partial.run(tmp_path / "b", CONFIG)
    resumed = make_trainer(tiny_data_dir, model_seed=7, **outer)  # a different initial theta
    assert not thetas_equal(resumed.theta, partial.theta)
    assert resumed.resume(tmp_path / "b", CONFIG) == 3
    assert thetas_equal(resumed.theta, partial.theta)
    assert resumed.history == partial.history
    adam, saved_adam = resumed.optimizer.state_dict(), partial.optimizer.state_dict()
    assert adam["param_groups"] == saved_adam["param_groups"]
    for i, entry in saved_adam["state"].items():
        assert entry["step"].item() == 3.0
        assert all(torch.equal(adam["state"][i][f], entry[f]) for f in entry)

    resumed.run(tmp_path / "b", CONFIG)  # meta_steps: 6 in its config
    assert len(resumed.history) == 6
    assert resumed.history == full.history
    assert thetas_equal(resumed.theta, full.theta)
    theta, saved = load_adapter(tmp_path / "b")
    assert saved["meta_steps_done"] == 6
    assert all(torch.equal(theta[k], full.theta[k].detach()) for k in theta)
    ckpt = tmp_path / "b" / CHECKPOINT_DIR
    # the newest state and the one before it (kept for when the newest is damaged), nothing older
    names = {STATE, PREVIOUS_STATE, "state-00000003.safetensors", "state-00000006.safetensors"}
    assert {p.name for p in ckpt.iterdir()} == names
    assert json.loads((ckpt / PREVIOUS_STATE).read_text())["step"] == 3


def test_ctrl_c_finishes_the_step_saves_it_and_resume_continues_bit_exactly(tiny_data_dir, tmp_path):
    """Ctrl-C in a run that saves only at the end (save_every 0) keeps the steps done: the step
    under way finishes and is saved, KeyboardInterrupt follows, and --resume ends where an
    uninterrupted run ends. A second Ctrl-C stops at once; the handler is put back after."""
    full = make_trainer(tiny_data_dir)
    full.run(None, CONFIG)
    handler_before = signal.getsignal(signal.SIGINT)

    def ctrl_c_at_step_2(logs):
        if logs["step"] == 1:  # 0-based: the second meta-step has just finished
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = make_trainer(tiny_data_dir)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(tmp_path, CONFIG, save_every=0, on_step=ctrl_c_at_step_2)
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert load_state(tmp_path / CHECKPOINT_DIR)[1]["step"] == 2 and len(interrupted.history) == 2
    resumed = make_trainer(tiny_data_dir)
    assert resumed.resume(tmp_path, CONFIG) == 2
    resumed.run(tmp_path, CONFIG)
    assert resumed.history == full.history and thetas_equal(resumed.theta, full.theta)

    def ctrl_c_twice(logs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the second one raises here, before the step is saved

    twice = make_trainer(tiny_data_dir)
    with pytest.raises(KeyboardInterrupt):
        twice.run(tmp_path / "twice", CONFIG, save_every=0, on_step=ctrl_c_twice)
    assert not (tmp_path / "twice" / CHECKPOINT_DIR).exists()
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_resume_refuses_other_config_model_or_missing_state(tiny_data_dir, tmp_path):
    trainer = make_trainer(tiny_data_dir, meta_steps=2)
    config = {"meta": {"meta_steps": 2, "beta": 1e-6}, "tasks": {"data_dir": "x", "k": 4}}
    trainer.run(tmp_path, config)

    grown = {"meta": {"meta_steps": 9, "beta": 1e-6}, "tasks": {"data_dir": "moved", "k": 4}}
    assert make_trainer(tiny_data_dir).resume(tmp_path, grown) == 2  # steps and data folder may change
    changed = {"meta": {"meta_steps": 2, "beta": 1e-3}, "tasks": {"data_dir": "x", "k": 4}}
    with pytest.raises(CheckpointError, match=r"different config \(meta.beta: 1e-06 -> 0.001\)"):
        make_trainer(tiny_data_dir).resume(tmp_path, changed)
    with pytest.raises(CheckpointError, match="do not match this model"):
        make_trainer(tiny_data_dir, rank=3).resume(tmp_path, config)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere' / CHECKPOINT_DIR / STATE}: not found"):
        make_trainer(tiny_data_dir).resume(tmp_path / "nowhere")


def test_resume_refuses_a_damaged_trainer_state(tiny_data_dir, tmp_path):
    make_trainer(tiny_data_dir, meta_steps=2).run(tmp_path, CONFIG)
    state_json = tmp_path / CHECKPOINT_DIR / STATE
    good = json.loads(state_json.read_text())

    state_json.write_text(json.dumps({**good, "history": good["history"][:1]}))
    with pytest.raises(CheckpointError, match="history does not hold the 2 steps"):
        make_trainer(tiny_data_dir).resume(tmp_path)
    state_json.write_text(json.dumps({**good, "task_rng": [3, [1, 2], None]}))
    fresh = make_trainer(tiny_data_dir)
    before = {k: v.clone() for k, v in fresh.theta.items()}
    with pytest.raises(CheckpointError, match="invalid trainer state"):
        fresh.resume(tmp_path)
    assert thetas_equal(fresh.theta, before) and fresh.history == []  # nothing half-restored
    for bad in ({"step": 0}, {"step": 0, "nll": "0.7"}, {"step": 0, "nll": 10**400}):  # no NLL, not a float
        state_json.write_text(json.dumps({**good, "validation": [bad]}))
        with pytest.raises(CheckpointError, match="invalid trainer state"):
            fresh.resume(tmp_path)
        assert thetas_equal(fresh.theta, before) and fresh.history == [] and fresh.validation == []

    from safetensors.torch import load_file, save_file

    tensors = tmp_path / CHECKPOINT_DIR / good["tensors"]
    saved = load_file(tensors)
    save_file({**saved, "best/nope": torch.zeros(2)}, tensors, metadata={"format": good["format"], "step": "2"})
    state_json.write_text(json.dumps({**good, "sha256": {good["tensors"]: file_sha256(tensors)}}))  # written, not damaged
    fresh = make_trainer(tiny_data_dir)
    with pytest.raises(CheckpointError, match="best prior's tensors do not match"):
        fresh.resume(tmp_path)
    assert thetas_equal(fresh.theta, before) and fresh.history == []  # nothing half-restored
    save_file(saved, tensors, metadata={"format": good["format"], "step": "2"})
    torch.save({"theta": torch.zeros(2)}, tensors)  # a pickle in place of safetensors
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        make_trainer(tiny_data_dir).resume(tmp_path)


# ---------------------------------------------------------------- SIGKILL, then --resume


def cli_args(model_dir, data_dir) -> list[str]:
    flags = dict(split="tiny", max_query=4, meta_steps=12, inner_steps=2, outer_lr=0.05, save_every=2, device="cpu")
    return ["meta-train", *tiny_cli(model_dir, data_dir, **flags)]


# The adapter initialisation draws from torch's global generator when the model is built, so
# every run seeds it first: the killed subprocess and the in-process reference start equal.
KILLED_RUN = (
    "import sys, torch; torch.set_num_threads(1); torch.manual_seed(0); from abmll.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tiny_model_dir, tiny_data_dir, tmp_path):
    args = cli_args(tiny_model_dir, tiny_data_dir)
    killed = tmp_path / "killed"
    state_json = killed / CHECKPOINT_DIR / STATE
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=err
        )
        deadline = time.monotonic() + 120
        while not (state_json.is_file() and json.loads(state_json.read_text())["step"] >= 4):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no checkpoint of step 4 within 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    done_at_kill = load_state(killed / CHECKPOINT_DIR)[1]["step"]
    assert done_at_kill in range(4, 12, 2)

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    torch.manual_seed(0)
    assert main([*args, "--out", str(tmp_path / "full")]) == 0

    resumed, cfg = load_adapter(killed)
    full, _ = load_adapter(tmp_path / "full")
    assert cfg["meta_steps_done"] == 12
    assert max((resumed[k] - full[k]).abs().max().item() for k in full) <= 1e-7
    assert any(full[k].abs().sum() > 0 for k in full if "lora_B" in k)  # trained, not the init
    history = json.loads((killed / "history.json").read_text())
    assert history == json.loads((tmp_path / "full" / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(12))


# ---------------------------------------------------------------- non-finite loss or gradient


def poison(monkeypatch, bad_step: int, kind: str, seen: dict) -> None:
    """Make meta-step ``bad_step`` produce a NaN loss (``kind="loss"``: NaN option scores) or
    only NaN gradients on theta (``kind="gradient"``); ``seen`` records the tasks, theta and
    output files just before that step."""
    real_step, real_scores = train.meta_step, meta.option_scores

    def meta_step(model, theta, optimizer, batch, config, hyper, step, **kwargs):
        if step != bad_step:
            return real_step(model, theta, optimizer, batch, config, hyper, step, **kwargs)
        seen.update(
            tasks=[t.task for t in batch],
            theta={k: v.detach().clone() for k, v in theta.items()},
            files=file_bytes(seen["out"]) if seen.get("out") else {},
        )
        with monkeypatch.context() as m:
            if kind == "loss":
                m.setattr(meta, "option_scores", lambda *a, **kw: real_scores(*a, **kw) * math.nan)
                return real_step(model, theta, optimizer, batch, config, hyper, step, **kwargs)
            first = next(iter(theta.values()))
            hook = first.register_hook(lambda grad: torch.full_like(grad, math.nan))
            try:
                return real_step(model, theta, optimizer, batch, config, hyper, step, **kwargs)
            finally:
                hook.remove()

    monkeypatch.setattr(train, "meta_step", meta_step)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_nonfinite_step_stops_and_keeps_last_good_checkpoint(tiny_data_dir, tmp_path, monkeypatch, kind):
    seen = {"out": tmp_path}
    poison(monkeypatch, 3, kind, seen)
    trainer = make_trainer(tiny_data_dir)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run(tmp_path, CONFIG, save_every=2)
    message = str(info.value)
    assert "meta-step 3" in message and f"last good checkpoint (step 2) is kept in {tmp_path}" in message
    assert f"meta-batch tasks {seen['tasks']}" in message
    first = next(iter(seen["theta"]))  # the key whose gradient was poisoned
    assert ("support NLL nan" if kind == "loss" else f"non-finite meta-gradient of {first}") in message
    assert file_bytes(tmp_path) == seen["files"]  # checkpoint untouched
    assert load_state(tmp_path / CHECKPOINT_DIR)[1]["step"] == 2
    assert thetas_equal(trainer.theta, seen["theta"]) and len(trainer.history) == 3
    assert make_trainer(tiny_data_dir).resume(tmp_path, CONFIG) == 2


def test_skip_nonfinite_logs_the_skipped_meta_batch(tiny_data_dir, tmp_path, monkeypatch):
    seen, after_step = {}, []
    poison(monkeypatch, 3, "loss", seen)
    trainer = make_trainer(tiny_data_dir)
    snapshot = lambda logs: after_step.append({k: v.detach().clone() for k, v in trainer.theta.items()})  # noqa: E731
    with pytest.warns(RuntimeWarning, match=r"skipping meta-step 3 \(tasks"):
        trainer.run(tmp_path, CONFIG, save_every=2, on_step=snapshot, skip_nonfinite=True)
    skipped = trainer.history[3]
    assert skipped["skipped"] is True and skipped["tasks"] == seen["tasks"] and "nan" in skipped["error"]
    assert "query_nll" not in skipped
    assert [h["step"] for h in trainer.history] == list(range(6)) and trainer.skipped_steps == 1
    assert all(math.isfinite(h["loss"]) for h in trainer.history if not h.get("skipped"))
    assert all(torch.isfinite(v).all() for v in trainer.theta.values())
    assert thetas_equal(after_step[3], after_step[2]) and thetas_equal(after_step[3], seen["theta"])
    assert not thetas_equal(after_step[4], after_step[3])  # later steps still train
    _, saved = load_adapter(tmp_path)
    assert saved["meta_steps_done"] == 6 and saved["meta_steps_skipped"] == 1
    assert json.loads((tmp_path / "history.json").read_text())[3]["skipped"] is True


def test_cli_nonfinite_and_resume_errors_exit_1(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    seen = {}
    poison(monkeypatch, 3, "loss", seen)
    args = [*cli_args(tiny_model_dir, tiny_data_dir), "--meta_steps", "5", "--inner_steps", "1"]
    assert main([*args, "--out", str(tmp_path / "stop")]) == 1
    err = capsys.readouterr().err
    assert "abmll meta-train: error: meta-step 3" in err and str(seen["tasks"]) in err
    assert load_adapter(tmp_path / "stop")[1]["meta_steps_done"] == 2

    with pytest.warns(RuntimeWarning, match="skipping meta-step 3"):
        assert main([*args, "--out", str(tmp_path / "skip"), "--skip_nonfinite"]) == 0
    assert load_adapter(tmp_path / "skip")[1]["meta_steps_skipped"] == 1

    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert f"{tmp_path / 'none' / CHECKPOINT_DIR / STATE}: not found" in capsys.readouterr().err


# ---------------------------------------------------------------- meta-validation and the best prior


class RecordingValidator:
    """A stand-in validator: NLL from a fixed sequence, and a copy of each theta it scored."""

    def __init__(self, nlls):
        self.nlls, self.seen = list(nlls), []

    def __call__(self, theta):
        self.seen.append({k: v.detach().clone() for k, v in theta.items()})
        torch.manual_seed(12345)  # a validator's own seeding must not reach the run
        return {"nll": self.nlls[len(self.seen) - 1], "ece": 0.1}


def test_validation_curve_best_prior_and_exact_resume(tiny_data_dir, tmp_path):
    nlls = [1.0, 0.7, 0.4, 0.6]  # steps 0, 2, 4, 6: the best is step 4
    ref = make_trainer(tiny_data_dir)
    ref.validator, ref.validate_every = RecordingValidator(nlls), 2
    plain = make_trainer(tiny_data_dir)
    plain.run(None, CONFIG)
    ref.run(tmp_path / "ref", CONFIG)
    assert thetas_equal(ref.theta, plain.theta)  # validating does not change the run
    assert [v["step"] for v in ref.validation] == [0, 2, 4, 6]
    assert json.loads((tmp_path / "ref" / "validation.json").read_text()) == ref.validation
    best, saved = load_adapter(tmp_path / "ref" / train.BEST_DIR)
    assert saved["meta_steps_done"] == 4 and saved["validation_nll"] == 0.4
    assert thetas_equal(best, ref.validator.seen[2])

    first = make_trainer(tiny_data_dir, meta_steps=4)  # stops after step 4, then resumes to 6
    first.validator, first.validate_every = RecordingValidator(nlls), 2
    first.run(tmp_path / "run", CONFIG, save_every=2)
    again = make_trainer(tiny_data_dir)
    again.validator, again.validate_every = RecordingValidator(nlls[3:]), 2
    assert again.resume(tmp_path / "run") == 4
    again.run(tmp_path / "run", CONFIG, save_every=2)
    assert thetas_equal(again.theta, ref.theta) and again.validation == ref.validation
    best_again, _ = load_adapter(tmp_path / "run" / train.BEST_DIR)
    assert thetas_equal(best_again, best)


def test_a_failed_validation_is_logged_and_the_last_step_is_always_validated(tiny_data_dir, tmp_path):
    class Flaky:
        calls = 0

        def __call__(self, theta):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise NonFiniteLossError("adaptation diverged")
            return {"nll": float("nan") if Flaky.calls == 2 else 0.5, "ece": 0.1}

    trainer = make_trainer(tiny_data_dir, meta_steps=5)
    trainer.validator, trainer.validate_every = Flaky(), 2
    trainer.run(tmp_path / "run", CONFIG)
    assert [v["step"] for v in trainer.validation] == [0, 2, 4, 5]  # 5: the last step, off the grid
    assert trainer.validation[0]["nll"] == math.inf and "diverged" in trainer.validation[0]["error"]
    _, saved = load_adapter(tmp_path / "run" / train.BEST_DIR)
    assert saved["meta_steps_done"] == 4 and saved["validation_nll"] == 0.5  # NaN never wins


def test_episode_sampler_state_dict_continues_the_same_draws():
    from abmll.episodes import EpisodeSampler

    sampler = EpisodeSampler(["a", "b", "c"], [1, 2, 3], meta_batch_size=2, seed=7)
    sampler.sample()
    state = json.loads(json.dumps(sampler.state_dict()))  # saved as JSON with the run
    expected = [sampler.sample() for _ in range(5)]
    again = EpisodeSampler(["a", "b", "c"], [1, 2, 3], meta_batch_size=2, seed=0)
    again.load_state_dict(state)
    assert [again.sample() for _ in range(5)] == expected
    assert all(len({t for t, _ in batch}) == 2 for batch in expected)  # distinct tasks per meta-batch
    many = EpisodeSampler(["a"], [1], meta_batch_size=3).sample()
    assert many == [("a", 1)] * 3  # with replacement when B > tasks
    with pytest.raises((TypeError, ValueError)):
        again.load_state_dict({"task_rng": [3, [1, 2], None]})
