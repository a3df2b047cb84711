"""Copy a meta-trained prior (its best-by-validation checkpoint) into the package as a shipped
prior, with its record, so ``abmll adapt|predict|evaluate`` take it by a short name.

    .venv/bin/python benchmarks/ship_prior.py --run runs/quality-class_to_class/prior-abmll-<hash> \\
        --name smollm2-135m-class_to_class --command "<the command that trained it>" \\
        --adaptation adamw:10:0.01

Writes src/abmll/priors/<name>/{adapter.safetensors, abmll_config.json, record.json}; the
record holds the command, the code commit, the meta-steps done and the validation curve. The
adaptation recipe the prior was chosen with goes into its abmll_config.json (``eval``:
test_optimizer, test_steps, test_lr), so ``abmll adapt|predict|evaluate`` use it unless their
flags say otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bench_flags

from abmll.checkpoint import CONFIG, TENSORS, load_adapter, write_json
from abmll.config import EvalArgs
from abmll.priors import SHIPPED_DIR
from abmll.train import BEST_DIR


@dataclass
class ShipArgs:
    """Flags of benchmarks/ship_prior.py (all required).

    Attributes:
        run: a meta-training output folder (holds best/, history.json, validation.json).
        name: short name of the shipped prior.
        command: the command that trained the prior (recorded).
        adaptation: OPTIMIZER:STEPS:LR, the test-time adaptation chosen for this prior on dev
            (e.g. adamw:10:0.01), carried in its config as its default recipe.
    """

    run: str
    name: str
    command: str
    adaptation: str


def main(argv: list[str] | None = None) -> Path:
    (args,) = bench_flags.parse(argv, ShipArgs, script="ship_prior.py", description=__doc__.splitlines()[0])
    run = Path(args.run)
    source = run / BEST_DIR if (run / BEST_DIR).is_dir() else run
    load_adapter(source)  # refuses a folder that is not a readable prior
    out = SHIPPED_DIR / args.name
    out.mkdir(parents=True, exist_ok=True)
    recipe = adaptation_recipe(args.adaptation)
    for name in (TENSORS, CONFIG):
        shutil.copyfile(source / name, out / name)
    config = json.loads((out / CONFIG).read_text())
    write_json(out / CONFIG, {**config, "eval": {**config.get("eval", {}), **recipe}})
    _, config = load_adapter(out)
    history = json.loads((run / "history.json").read_text())
    validation = json.loads((run / "validation.json").read_text()) if (run / "validation.json").is_file() else []
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    write_json(
        out / "record.json",
        {
            "name": args.name,
            "command": args.command,
            "shipped_at_commit": commit,
            "source": str(source),
            "meta_steps_trained": len(history),
            "meta_steps_of_this_prior": config.get("meta_steps_done"),
            "selected_by": config.get("selected_by", "last meta-step"),
            "validation": validation,
            "adaptation": recipe,
        },
    )
    print(f"shipped {source} as {out}")
    return out


def adaptation_recipe(text: str) -> dict:
    """``OPTIMIZER:STEPS:LR`` as the eval-group fields it sets, checked by :class:`EvalArgs`.

    Raises:
        SystemExit: not of that form, or a value EvalArgs refuses.
    """
    try:
        optimizer, steps, lr = text.split(":")
        recipe = {"test_optimizer": optimizer, "test_steps": int(steps), "test_lr": float(lr)}
        EvalArgs(**recipe)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"--adaptation takes OPTIMIZER:STEPS:LR (e.g. adamw:10:0.01), got {text!r} ({err})") from None
    return recipe


if __name__ == "__main__":
    main()
