"""The ``abmll`` command: a table of commands, each a typed argument parser in front of one
function of :mod:`abmll.commands`.

    abmll --version
    abmll meta-train [--config run.yaml] [--flag value ...] --out DIR
    abmll evaluate   --prior DIR [--flag value ...] [--out DIR]
    abmll demo       [--out DIR]        (meta-train + evaluate with src/abmll/demo.yaml)
    abmll adapt      --prior DIR --support FILE.jsonl --out DIR      (a task posterior, PEFT format)
    abmll predict    --adapter DIR --input FILE.jsonl [--out DIR] [--eval_samples N]
    abmll export     --adapter DIR --out DIR                         (abmll prior -> PEFT LoRA folder)
    abmll data       --task NAME (--dataset NAME | --data_files train=F test=F) --out DATA_DIR ...

``abmll <command> --help`` lists that command's flags with their help and choices. Each
command takes the fields of the config groups it uses as flags (``--inner_steps 3``);
``--config FILE.yaml`` sets defaults that flags override (flat keys or grouped by section);
every command accepts the same file and ignores the sections it does not use. Commands that
read an adapter (evaluate, adapt, predict, export) start from the config saved with it, which
the file and the flags override. The resolved config is saved beside every checkpoint and
result. ``--tensorboard DIR`` (meta-train, evaluate, demo) logs scalars when tensorboard is
installed; ``--plots false`` turns off the PNG plots. Each command writes to ``runs/<command>``
unless ``--out`` says otherwise. The libraries' warnings and loading bars are hidden unless
``--verbose``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from abmll.args import (
    ALL_GROUPS,
    AdaptArgs,
    DataArgs,
    EvaluateArgs,
    ExportArgs,
    PredictArgs,
    ReportArgs,
    RunArgs,
    TrainArgs,
    parse_args,
)
from abmll.command_names import COMMANDS
from abmll.commands.adapt import run_adapt
from abmll.commands.data import run_data
from abmll.commands.evaluate import PARTIAL_RESULTS, RESULTS, check_cli_methods, check_evaluate_inputs, run_evaluate
from abmll.commands.export import run_export
from abmll.commands.meta_train import meta_train, report_writer
from abmll.commands.predict import PREDICTIONS, run_predict
from abmll.config import CONFIG_GROUPS, DEMO_CONFIG
from abmll.data import DataError
from abmll.loading import build_model, load_prior
from abmll.meta import NonFiniteLossError
from abmll.methods import get_spec
from abmll.outputs import complete_lines, read_json_or_none
from abmll.quiet import library_output
from abmll.roles import ADAPTATION, BASELINE, EVALUATION, MACHINE, OUTER, PREDICTION, ROLES, RUN, names
from abmll.train import CHECKPOINT_DIR
from abmll.train_state import STATE


def _meta_train(run, cfg, train, report):
    with report_writer(report) as writer:
        meta_train(run, train, cfg, report, writer)


def _evaluate(run, cfg, args, report):
    check_cli_methods(args.methods)
    if not args.prior and any(get_spec(n).prior == "abmll" for n in args.methods):
        raise SystemExit("evaluate: --prior DIR is required (or --methods without ABMLL, e.g. zero_shot lora)")
    check_evaluate_inputs(run, cfg)
    if args.prior:
        model, tokenizer, theta, status = load_prior(args.prior, cfg)
    else:  # zero-shot and per-task baselines: the base model as the flags say
        (model, tokenizer), theta, status = build_model(cfg), None, None
    with report_writer(report) as writer:
        run_evaluate(run, cfg, model, tokenizer, theta, report, writer, prior=status, methods=args.methods)


def _demo(run, cfg, train, report):
    check_evaluate_inputs(run, cfg)
    with report_writer(report) as writer:
        run_evaluate(run, cfg, *meta_train(run, train, cfg, report, writer), report, writer)


@dataclass(frozen=True)
class Command:
    """One row of the command table: its config groups, its own argument classes, the flag
    naming the adapter whose saved config gives defaults, what it runs, and the roles of the
    fields it takes (:mod:`abmll.roles`; fields of its groups with other roles are not flags)."""

    groups: list[str]
    args: tuple
    adapter_flag: str | None
    run: Callable
    roles: tuple[str, ...] = ROLES

    def unused(self) -> tuple[str, ...]:
        """The fields of this command's groups and argument classes whose role it does not take."""
        classes = [*self.args, *(CONFIG_GROUPS[g] for g in self.groups)]
        return tuple(name for cls in classes for name in names(cls, *(r for r in ROLES if r not in self.roles)))


TRAINING = (RUN, MACHINE, OUTER, ADAPTATION, PREDICTION)
"""meta-train: validation adapts and predicts; no held-out evaluation."""
EVALUATING = (RUN, MACHINE, ADAPTATION, PREDICTION, EVALUATION)

COMMAND_TABLE = {
    "meta-train": Command(ALL_GROUPS, (TrainArgs, ReportArgs), None, _meta_train, TRAINING),
    "evaluate": Command(ALL_GROUPS, (EvaluateArgs, ReportArgs), "prior", _evaluate, (*EVALUATING, BASELINE)),
    "demo": Command(ALL_GROUPS, (TrainArgs, ReportArgs), None, _demo, (*TRAINING, EVALUATION)),
    "adapt": Command(
        ["model", "lora", "scoring", "meta", "eval"],
        (AdaptArgs,),
        "prior",
        lambda run, cfg, args: run_adapt(run, args, cfg),
        (RUN, MACHINE, ADAPTATION),
    ),
    "predict": Command(
        ["model", "lora", "scoring", "eval"],
        (PredictArgs,),
        "adapter",
        lambda run, cfg, args: run_predict(run, args, cfg),
        (RUN, MACHINE, PREDICTION),
    ),
    "export": Command(["model", "lora"], (ExportArgs,), "adapter", lambda run, cfg, args: run_export(run, args, cfg)),
    "data": Command([], (DataArgs,), None, lambda run, cfg, args: run_data(run, args)),
}
assert tuple(COMMAND_TABLE) == COMMANDS


def _close_bars() -> None:
    """End every open progress bar's line, so a message printed next starts on its own line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _saved_note(command: str, run: RunArgs | None, extra: list) -> str:
    """What an interrupted ``command`` left in ``run.out`` and how to continue."""
    if run is None:
        return "nothing was written"
    out = Path(run.out)
    if command == "demo" and (out / PARTIAL_RESULTS).is_file():
        return f"the prior is saved in {out}; evaluation results so far in {out / PARTIAL_RESULTS}"
    if command in ("meta-train", "demo"):
        state = read_json_or_none(out / CHECKPOINT_DIR / STATE)
        if state is None:
            return f"no checkpoint was written yet in {out} (--save_every {extra[0].save_every})"
        return (
            f"the run is saved at meta-step {state['step']} in {out}; continue it with the same command "
            "and --resume (without --overwrite)"
        )
    if command in ("evaluate", "demo") and (out / RESULTS).is_file():
        return f"the results were saved in {out / RESULTS} (the plots may be missing)"
    if command in ("evaluate", "predict"):
        log = out / (PARTIAL_RESULTS if command == "evaluate" else PREDICTIONS)
        n = max(len(complete_lines(log)) - (command == "evaluate"), 0)
        return f"{n} finished result line(s) kept in {log}; run the same command again to resume"
    return f"nothing was written to {out} (it is written only when complete)"


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """Run one ``abmll`` command (``argv`` default: ``sys.argv[1:]``). Returns the exit
    status: 0 done (or ``--help``), 1 a reported error (bad data, non-finite loss, bad
    value, unreadable file or checkpoint: one line on stderr, finished outputs kept),
    2 no or unknown command (the usage is printed), 130 interrupted (Ctrl-C: one line
    saying what was saved and how to resume). The wall time printed at the end counts from
    ``started`` (a ``time.perf_counter()``; the console entry's start, before torch is
    imported), else from this call."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    spec = COMMAND_TABLE[command]
    start = time.perf_counter() if started is None else started
    run, extra = None, []
    try:
        if command == "demo":
            replace = [] if "--resume" in rest else ["--overwrite"]  # a demo run replaces the previous one
            rest = ["--config", str(DEMO_CONFIG), *replace, *rest]
        run, cfg, extra = parse_args(
            rest, spec.groups, spec.args, spec.adapter_flag, command, default_out=f"runs/{command}", unused=spec.unused()
        )
        with library_output(run.verbose):
            spec.run(run, cfg, *extra)
    except (DataError, NonFiniteLossError, ValueError, OSError) as err:
        _close_bars()
        print(f"abmll {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close_bars()
        print(f"abmll {command}: interrupted; {_saved_note(command, run, extra)}", file=sys.stderr)
        return 130
    finally:
        # under `accelerate launch`: shut the process group down before interpreter exit
        # (left to the exit handlers, gloo sometimes aborted an FSDP run that had finished)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
