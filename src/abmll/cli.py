"""The ``abmll`` command: thin wrappers that parse dataclass configs and call the library.

    abmll meta-train [--config run.yaml] [--flag value ...] --out DIR
    abmll evaluate   --prior DIR [--flag value ...] [--out DIR]
    abmll demo       [--out DIR]        (meta-train + evaluate with configs/demo.yaml)

Every field of the config dataclasses is a flag (``--inner_steps 3`` or ``--inner-steps 3``);
``--config FILE.yaml`` sets defaults that flags override (flat keys or grouped by section).
The resolved config is saved beside every checkpoint and result.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import yaml
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from abmll.bayes_lora import BayesLoraModel
from abmll.checkpoint import load_adapter, write_json
from abmll.config import CONFIG_GROUPS, EvalArgs, TaskArgs, from_dict, to_dict
from abmll.data import DataError
from abmll.evaluate import Method, evaluate
from abmll.meta import NonFiniteLossError
from abmll.models import load_base_model, resolve_device
from abmll.train import MetaTrainer, task_names

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


@dataclass
class RunArgs:
    """Command-level options.

    Attributes:
        config: YAML file of defaults (flags override it).
        out: output folder (prior, results, logs).
        prior: a prior folder written by ``abmll meta-train`` (evaluate).
        save_every: write the prior every N meta-steps (0: only at the end).
    """

    config: str | None = None
    out: str = "runs/abmll"
    prior: str | None = None
    save_every: int = 10


def _parse(argv: list[str], groups: list[str]):
    classes = [RunArgs] + [CONFIG_GROUPS[g] for g in groups]
    parser = HfArgumentParser(classes)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_flatten(yaml.safe_load(Path(known.config).read_text()) or {}, classes))
    run, *cfgs = parser.parse_args_into_dataclasses(argv)
    return run, dict(zip(groups, cfgs))


def _flatten(raw: dict, classes) -> dict:
    """YAML -> flat flag defaults; accepts ``{section: {field: value}}`` or flat keys."""
    names = {f.name for c in classes for f in fields(c)}
    flat = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) and key in CONFIG_GROUPS else [(key, value)]
        for k, v in items:
            if k not in names:
                raise SystemExit(f"config: unknown key {k!r}")
            flat[k] = v
    return flat


def _build(cfg: dict):
    m = cfg["model"]
    base, tokenizer = load_base_model(m.model, m.dtype, resolve_device(m.device))
    return BayesLoraModel(base, cfg["lora"]), tokenizer


TRAIN_GROUPS = ["model", "lora", "hyperprior", "scoring", "meta", "tasks"]
ALL_GROUPS = TRAIN_GROUPS + ["eval"]


def meta_train(run: RunArgs, cfg: dict) -> tuple[BayesLoraModel, object, dict]:
    """Meta-train and save the prior into ``run.out``; returns (model, tokenizer, theta)."""
    names = task_names(cfg["tasks"], "train")
    model, tokenizer = _build(cfg)
    trainer = MetaTrainer(model, tokenizer, names, cfg["tasks"], cfg["meta"], cfg["hyperprior"], cfg["scoring"])
    print(f"meta-training on {len(names)} tasks: {', '.join(names)}")
    bar = tqdm(total=cfg["meta"].meta_steps, desc="meta-train", unit="step")

    def on_step(logs):
        bar.update(1)
        bar.set_postfix(q_nll=f"{logs['query_nll']:.3f}", kl=f"{logs['kl']:.3g}",
                        s_nll=f"{logs['support_nll_before']:.3f}->{logs['support_nll_after']:.3f}")

    theta = trainer.run(run.out, to_dict(**cfg), run.save_every, on_step)
    bar.close()
    print(f"prior saved to {run.out}")
    return model, tokenizer, theta


def run_evaluate(run: RunArgs, cfg: dict, model, tokenizer, theta) -> dict:
    """Evaluate zero-shot and ABMLL on the split's test tasks; print and save the results."""
    tasks: TaskArgs = cfg["tasks"]
    names = task_names(tasks, "test")
    ev: EvalArgs = cfg["eval"]
    methods = [Method("zero_shot", model.init_params(), 0, 0), Method("abmll", theta, ev.test_steps, ev.eval_samples)]
    bar = tqdm(total=len(names) * len(tasks.data_seeds) * len(methods), desc="evaluate", unit="run")
    results = evaluate(model, tokenizer, methods, names, tasks.data_seeds, tasks, cfg["scoring"], cfg["meta"], ev,
                       on_result=lambda *a: bar.update(1))
    bar.close()
    results["config"] = to_dict(**cfg)
    out = Path(run.out) / "results.json"
    write_json(out, results)
    print(format_table(results))
    print(f"results saved to {out}")
    return results


def format_table(results: dict) -> str:
    """Per task (mean over seeds): accuracy, ECE and NLL of every method, then the task mean."""
    methods = list(results["methods"])
    head = f"{'task':32s}" + "".join(f" | {m + ' acc':>14s} {'ECE':>6s} {'NLL':>6s}" for m in methods)
    lines = [head, "-" * len(head)]
    rows = [(t, {m: results["methods"][m]["per_task"][t]["mean"] for m in methods}) for t in results["tasks"]]
    rows.append(("mean over tasks", {m: results["methods"][m]["mean"] for m in methods}))
    for name, by_method in rows:
        lines.append(f"{name:32s}" + "".join(
            f" | {r['accuracy']:14.3f} {r['ece']:6.3f} {r['nll']:6.3f}" for r in by_method.values()))
    return "\n".join(lines)


def _load_prior(folder: str, cfg: dict):
    theta, saved = load_adapter(folder)
    for group in TRAIN_GROUPS:
        if group != "tasks":
            cfg[group] = from_dict(saved, group)
    model, tokenizer = _build(cfg)
    device = next(model.parameters()).device
    return model, tokenizer, {k: v.to(device) for k, v in theta.items()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"meta-train", "evaluate", "demo"}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    start = time.perf_counter()
    try:
        if command == "meta-train":
            run, cfg = _parse(rest, TRAIN_GROUPS)
            meta_train(run, cfg)
        elif command == "evaluate":
            run, cfg = _parse(rest, ALL_GROUPS)
            if not run.prior:
                raise SystemExit("evaluate: --prior DIR is required")
            run_evaluate(run, cfg, *_load_prior(run.prior, cfg))
        else:
            run, cfg = _parse(["--config", str(DEMO_CONFIG), "--out", "runs/demo"] + rest, ALL_GROUPS)
            run_evaluate(run, cfg, *meta_train(run, cfg))
    except (DataError, NonFiniteLossError, ValueError, OSError) as err:
        print(f"abmll {command}: error: {err}", file=sys.stderr)
        return 1
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
