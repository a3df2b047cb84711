"""abmll.roles: each config field's role, declared once, and what is derived from it: the
flags each command takes, the keys of results and priors, what may change on resume, what a
saved config hands on."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from abmll.bayes_lora import BayesLoraConfig
from abmll.cli import COMMAND_TABLE
from abmll.config import CONFIG_GROUPS, EvalArgs, ModelArgs, RunConfig, TaskArgs, from_dict, key_dict, result_config
from abmll.meta import MetaConfig
from abmll.roles import MACHINE, OUTER, RUN, names, role, setting, without_marks
from abmll.scoring import ScoringConfig
from abmll.train import config_changes

ROOT = Path(__file__).parent.parent
HAND_LISTS = ("OUTER_LOOP", "BASELINES", "MACHINE_FIELDS", "ADDED_FIELDS", "RESUMABLE_CHANGES", "PRIOR_ONLY")


def test_no_module_keeps_a_hand_list_of_fields_by_role():
    pattern = re.compile(r"\b(" + "|".join(HAND_LISTS) + r")\b")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("src", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


def _flags(command: str) -> set[str]:
    spec = COMMAND_TABLE[command]
    classes = [*spec.args, *(CONFIG_GROUPS[g] for g in spec.groups)]
    offered = {f.name for cls in classes for f in fields(cls)} - set(spec.unused())
    return offered


@pytest.mark.parametrize("command", list(COMMAND_TABLE))
def test_a_command_takes_exactly_the_fields_whose_role_it_takes(command):
    spec = COMMAND_TABLE[command]
    for cls in [*spec.args, *(CONFIG_GROUPS[g] for g in spec.groups)]:
        for f in fields(cls):
            assert (f.name in _flags(command)) == (role(f) in spec.roles), (command, f.name, role(f))


def test_roles_give_each_command_the_flags_its_work_needs():
    assert {"meta_steps", "outer_lr", "train_tasks", "log_support_after"} <= _flags("meta-train")
    assert not {"max_test", "compare_priors", "ensemble_members"} & _flags("meta-train")  # no held-out evaluation
    assert {"test_steps", "eval_samples", "max_test", "ensemble_members", "compare_priors"} <= _flags("evaluate")
    assert not {"meta_steps", "inner_steps", "a0", "val_tasks", "log_support_after"} & _flags("evaluate")
    assert "test_lr" in _flags("adapt") and not {"eval_samples", "max_test", "outer_lr"} & _flags("adapt")
    assert "eval_samples" in _flags("predict") and not {"test_steps", "test_lr"} & _flags("predict")
    assert {"device", "frozen_cache_mb"} <= _flags("adapt") & _flags("predict")  # machine fields: every command


def test_machine_fields_enter_no_key_and_are_not_handed_on():
    cfg = RunConfig(model=ModelArgs(device="cpu"), lora=BayesLoraConfig(frozen_cache_mb=7))
    config = result_config(cfg)
    assert "device" not in config["model"] and "frozen_cache_mb" not in config["lora"]
    assert config["model"]["model"] == cfg.model.model  # a run field stays
    saved = RunConfig(model=ModelArgs(), lora=BayesLoraConfig(frozen_cache_mb=7, rank=2)).to_dict()
    saved["model"]["device"] = "cuda:3"  # saved on a GPU machine: this one may have none
    assert from_dict(saved, "model").device == ModelArgs().device
    assert from_dict(saved, "lora").frozen_cache_mb == BayesLoraConfig().frozen_cache_mb
    assert from_dict(saved, "lora").rank == 2


def test_an_added_field_enters_a_key_only_when_set():
    assert "channel" not in key_dict(ScoringConfig()) and "test_optimizer" not in key_dict(EvalArgs())
    assert key_dict(ScoringConfig(channel=True))["channel"] is True
    assert key_dict(EvalArgs(test_optimizer="adamw", test_lr=0.01))["test_lr"] == 0.01
    assert "max_length" in key_dict(ScoringConfig())  # not added: always there


def test_only_resumable_and_machine_fields_may_change_on_resume():
    saved = RunConfig(meta=MetaConfig(), tasks=TaskArgs(), model=ModelArgs(), eval=EvalArgs()).to_dict()
    grown = RunConfig(
        meta=MetaConfig(meta_steps=99),
        tasks=TaskArgs(data_dir="/elsewhere"),
        model=ModelArgs(device="cpu"),
        eval=EvalArgs(ood_tasks=["glue-sst2"]),
    ).to_dict()
    assert config_changes(saved, grown) == []
    changed = RunConfig(meta=MetaConfig(inner_lr=0.1), tasks=TaskArgs(), model=ModelArgs(), eval=EvalArgs()).to_dict()
    assert config_changes(saved, changed) == ["meta.inner_lr: 0.5 -> 0.1"]


def test_saved_train_tasks_and_data_folder_are_not_handed_on_as_defaults():
    inherited = {f.name for f in fields(TaskArgs) if f.metadata.get("inherited", True) and role(f) != MACHINE}
    assert not {"data_dir", "train_tasks", "val_tasks"} & inherited and "split" in inherited


def test_setting_refuses_an_unknown_role_and_argparse_never_sees_the_marks():
    with pytest.raises(ValueError, match="unknown role 'outerloop'"):
        setting(1, role="outerloop")

    @dataclass
    class Toy:
        x: int = setting(3, role=OUTER, added=True)

    plain = without_marks(fields(Toy)[0])
    assert dict(plain.metadata) == {} and plain.default == 3 and plain.name == "x"
    assert role(fields(Toy)[0]) == OUTER and names(Toy, RUN) == ()


def test_outer_loop_fields_of_the_meta_config():
    assert set(names(MetaConfig, OUTER)) == {
        "inner_steps",
        "outer_lr",
        "gamma",
        "meta_batch_size",
        "meta_steps",
        "outer_update",
        "outer_warmup_steps",
        "outer_grad_clip",
    }
