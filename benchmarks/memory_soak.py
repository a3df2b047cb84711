"""Memory soak: does a long meta-training run keep its memory flat?

Runs 200 meta-steps (saving the prior and the trainer state every 20) on a tiny random Llama
with synthetic tasks, records the process RSS every 20 steps, and writes
benchmarks/results/memory_soak.{json,md} with the ratio RSS(step 200) / RSS(step 20); flat
means within 5%. Reported, not asserted in a test (RSS depends on the machine).

    .venv/bin/python benchmarks/memory_soak.py [--steps 200] [--every 20]

glibc keeps freed blocks in its heaps, which makes RSS drift without a leak; the script
re-executes itself with MALLOC_MMAP_THRESHOLD_=65536 (large blocks from mmap, returned to the
system when freed) unless that variable is already set. One torch thread, for steady timing.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MMAP_THRESHOLD = "65536"

if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    os.execv(sys.executable, [sys.executable, *sys.argv])

import bench_flags  # noqa: E402
import bench_report  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel  # noqa: E402
from abmll.config import TaskArgs  # noqa: E402
from abmll.gaussian_lora import HyperpriorConfig  # noqa: E402
from abmll.meta import MetaConfig  # noqa: E402
from abmll.scoring import ScoringConfig  # noqa: E402
from abmll.testing import tiny_llama, tiny_tokenizer  # noqa: E402
from abmll.train import MetaTrainer  # noqa: E402

TASKS = [f"task{i}" for i in range(8)]
SEEDS = [1, 2, 3]


def write_tasks(root: Path, k: int) -> None:
    """MetaICL-layout synthetic tasks: "yes" iff the input contains the task's letter; inputs
    of 3 to 40 characters so that batches have many different shapes."""
    rng = random.Random(0)
    (root / "task_meta").mkdir(parents=True)
    for i, task in enumerate(TASKS):
        (root / task).mkdir()
        for seed in SEEDS:
            for part in ("train", "dev"):
                lines = []
                for _ in range(k):
                    text = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(3, 40)))
                    answer = "yes" if "abcdefgh"[i] in text else "no"
                    lines.append(json.dumps({"task": task, "input": text, "output": answer, "options": ["no", "yes"]}))
                (root / task / f"{task}_{k}_{seed}_{part}.jsonl").write_text("\n".join(lines) + "\n")
        (root / "task_meta" / f"{task}.json").write_text(json.dumps({"task_type": "classification"}))


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def soak(steps: int, every: int) -> dict:
    torch.set_num_threads(1)
    k = 8
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        write_tasks(data, k)
        model = BayesLoraModel(tiny_llama(hidden_size=64), BayesLoraConfig(rank=4))
        trainer = MetaTrainer(
            model,
            tiny_tokenizer(),
            TASKS,
            TaskArgs(data_dir=str(data), k=k, data_seeds=SEEDS),
            MetaConfig(meta_steps=steps, inner_steps=3, n_samples=1),
            HyperpriorConfig(),
            ScoringConfig(max_rows=8),
        )
        rss = {0: rss_mib()}

        def on_step(logs: dict) -> None:
            done = logs["step"] + 1
            if done % every == 0:
                rss[done] = rss_mib()
                print(f"step {done:4d}: RSS {rss[done]:.1f} MiB", file=sys.stderr)

        start = time.perf_counter()
        trainer.run(out, {"benchmark": "memory_soak"}, save_every=every, on_step=on_step)
        seconds = time.perf_counter() - start
    ratio = rss[steps] / rss[every]
    return {
        "command": f"{os.path.relpath(sys.executable)} benchmarks/memory_soak.py --steps {steps} --every {every}",
        "environment": {
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "torch_threads": 1,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        },
        "run": {
            "model": "random Llama, 2 layers, hidden 64",
            "lora_rank": 4,
            "tasks": len(TASKS),
            "data_seeds": SEEDS,
            "k": k,
            "inner_steps": 3,
            "meta_batch_size": 2,
            "meta_steps": steps,
            "save_every": every,
            "seconds": round(seconds, 1),
        },
        "rss_mib": {str(s): round(v, 1) for s, v in sorted(rss.items())},
        f"rss_ratio_step{steps}_over_step{every}": round(ratio, 4),
        "flat_within_5_percent": abs(ratio - 1) <= 0.05,
    }


def markdown(result: dict, steps: int, every: int) -> str:
    ratio = result[f"rss_ratio_step{steps}_over_step{every}"]
    lines = [
        "# Memory soak",
        "",
        f"`{result['command']}` (re-executed with `MALLOC_MMAP_THRESHOLD_="
        f"{result['environment']['MALLOC_MMAP_THRESHOLD_']}`), {result['run']['model']}, "
        f"{steps} meta-steps, prior and trainer state saved every {every}, {result['run']['seconds']} s.",
        "",
        f"RSS(step {steps}) / RSS(step {every}) = **{ratio:.4f}** "
        f"({'flat: within 5%' if result['flat_within_5_percent'] else 'NOT within 5%'}).",
        "",
        "| meta-steps done | RSS (MiB) |",
        "|---:|---:|",
    ]
    lines += [f"| {s} | {v:.1f} |" for s, v in result["rss_mib"].items()]
    return "\n".join(lines) + "\n"


@dataclass
class SoakArgs:
    """Flags of benchmarks/memory_soak.py.

    Attributes:
        steps: meta-steps to run.
        every: save the prior and trainer state, and read the RSS, every this many meta-steps.
    """

    steps: int = 200
    every: int = 20


def main(argv: list[str] | None = None) -> None:
    (args,) = bench_flags.parse(argv, SoakArgs, script="memory_soak.py", description=__doc__.splitlines()[0])
    result = soak(args.steps, args.every)
    bench_report.write_results("memory_soak", result, markdown(result, args.steps, args.every))
    print(markdown(result, args.steps, args.every))


if __name__ == "__main__":
    main()
