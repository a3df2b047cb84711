"""Efficiency of ABMLL against plain LoRA and exact second-order meta-learning, in one run.

On identical batches (2 tasks: support and query of real glue-sst2 / rotten_tomatoes
examples), for K in {1, 2, 5, 10}:
  (a) lora:         (K + 1) * B plain peft LoRA steps (forward, backward, AdamW step),
  (b) abmll:        one first-order ABMLL meta-step (:func:`abmll.meta.meta_step`), as the
                    trainer runs it by default (flipout sampling);
      abmll_log:    the same with the support_nll_after logging forward
                    (``--log_support_after``: one extra no-grad forward per task),
      abmll_per_batch: the default meta-step with ``sampling="per_batch"`` (one weight
                    sample per forward, added to W0: one extra full-rank matmul, not three),
  (c) second_order: one exact meta-step back-propagating through the K inner steps.
Each (method, K) runs in a fresh child process (a process's peak RSS never goes down, and a
child inherits its parent's), started from this parent that never loads the model; glibc is
told to return freed memory (MALLOC_MMAP_THRESHOLD_) so RSS tracks live memory. On CUDA the
peak is torch.cuda.max_memory_allocated. All methods run attention on the math SDPA kernel
(the only CPU kernel with a double backward), so they are compared under one backend.

The headline step-time ratio (K=5) is timed in one process with lora and the three ABMLL
variants run in turn for several rounds (:func:`paired_step_time`), so load that drifts
between the separate processes cannot bias it; it runs at the trainer's default episode
size (``--paired-k``, 16 support + 16 query examples per task, TaskArgs.k / max_query).
The lora rows' tokens/s is the practical ceiling for
meta-training: the frozen base model's forward + backward on the same batches (plus a
rank-r adapter and its AdamW step).

Also: option-scoring speed, packed prompts vs one sequence per option, on ai2_arc (4
options); and a profile of one ABMLL meta-step.

    .venv/bin/python benchmarks/efficiency.py [--device cuda --dtype bfloat16 --tag gpu]

Writes benchmarks/results/efficiency[-TAG].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import bench_flags
import bench_report

RESULTS = bench_report.RESULTS
KS = [1, 2, 5, 10]
METHODS = ["lora", "abmll", "abmll_log", "abmll_per_batch", "second_order"]
ABMLL_VARIANTS = ["abmll", "abmll_log", "abmll_per_batch"]
TASKS = ["glue-sst2", "rotten_tomatoes"]


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(args):
    """Model, tokenizer and the two tasks' batches, all on the device."""
    import torch

    from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
    from abmll.data import load_episode
    from abmll.meta import TaskBatches
    from abmll.models import load_base_model, resolve_device
    from abmll.scoring import ScoringConfig, make_batches

    device = resolve_device(args.device)
    base, tok = load_base_model(args.model, args.dtype, device)
    model = BayesLoraModel(base, BayesLoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    scoring = ScoringConfig(max_length=64, max_rows=16)
    batches = lambda exs: [b.to(device) for b in make_batches(tok, exs[: args.k], scoring)]  # noqa: E731
    tasks = []
    shots = 8 if args.k <= 8 else 16
    for t in TASKS:  # the first k examples of the k-shot train (support) and dev (query) files
        ep = load_episode(t, shots, 100, "dev")
        tasks.append(TaskBatches(t, batches(ep.support), batches(ep.query)))
    with torch.no_grad():  # touch every weight before the memory baseline
        for p in model.parameters():
            p.add_(0)
    return model, tasks, device


def timed(fn, device) -> float:
    """Seconds ``fn()`` takes, waiting for queued CUDA work before and after on a GPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def make_step(method: str, K: int, model, tasks):
    """A closure running one unit of ``method`` on ``tasks``: (K + 1) * B plain LoRA steps
    for "lora", one meta-step otherwise (each method with its own adapter and optimizer)."""
    from dataclasses import replace

    import torch

    from abmll.gaussian_lora import HyperpriorConfig
    from abmll.meta import MetaConfig, meta_step, nll_backward

    cfg = MetaConfig(inner_steps=K, inner_lr=0.3, beta=1e-6, gamma=1e-10, n_samples=1, meta_batch_size=len(tasks))
    hyper = HyperpriorConfig()
    theta = {k: v.clone().requires_grad_() for k, v in model.init_params().items()}
    if method == "lora":
        lora = {k: theta[k] for k in model.mean_keys()}
        opt = torch.optim.AdamW(lora.values(), lr=1e-4)
        batches = [b for t in tasks for b in [t.support] * K + [t.query]]  # (K + 1) * B steps

        def step():
            for b in batches:
                opt.zero_grad(set_to_none=True)
                nll_backward(model, lora, b, n_samples=0)
                opt.step()

        return step
    opt = torch.optim.Adam(theta.values(), lr=1e-3)
    if method == "second_order":
        cfg = replace(cfg, outer_update="second_order")
    sampling = "per_batch" if method == "abmll_per_batch" else "flipout"

    def step():  # the sampler is read in each forward; the model is shared
        model.config = replace(model.config, sampling=sampling)
        meta_step(model, theta, opt, tasks, cfg, hyper, log_support_after=method == "abmll_log")

    return step


def child(args) -> dict:
    """Time one (method, K) in this process; returns its row."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tasks, device = setup(args)
    base_mem = peak_memory_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    K = args.k_inner
    step = make_step(args.method, K, model, tasks)
    with sdpa_kernel(SDPBackend.MATH):
        step()  # warm-up
        times = [timed(step, device) for _ in range(args.repeats)]
    positions = lambda batches: sum(b.input_ids.numel() for b in batches)  # noqa: E731
    work = sum(K * positions(t.support) + positions(t.query) for t in tasks)  # same for every method
    step_s = statistics.median(times)
    return dict(
        method=args.method, K=K, step_s=step_s, peak_mb=peak_memory_mb(device), baseline_mb=base_mem, tokens_per_s=work / step_s
    )


def paired_step_time(args, K: int = 5) -> dict:
    """Step time of the ABMLL variants relative to LoRA, in one process, at ``--paired-k``
    examples per task, all run in turn ``--paired-rounds`` times after a warm-up: each round's
    ratio compares steps taken within seconds of each other, so a load that drifts over
    minutes (another job on the machine) cancels out. Returns the per-round ratios and their
    medians; memory is measured by the per-process rows instead."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tasks, device = setup(argparse.Namespace(**{**vars(args), "k": args.paired_k}))
    methods = ("lora", *ABMLL_VARIANTS)
    steps = {m: make_step(m, K, model, tasks) for m in methods}

    rounds = []
    with sdpa_kernel(SDPBackend.MATH):
        for fn in steps.values():
            fn()  # warm-up
        for _ in range(args.paired_rounds):
            rounds.append({m: timed(fn, device) for m, fn in steps.items()})
    ratios = {m: [r[m] / r["lora"] for r in rounds] for m in methods[1:]}
    return {
        "K": K,
        "examples_per_task": args.paired_k,
        "rounds": rounds,
        "ratios": ratios,
        "median_ratio": {m: statistics.median(v) for m, v in ratios.items()},
    }


def scoring_speed(args) -> dict:
    """Examples/s of packed vs per-option scoring on ai2_arc, and their max score difference."""
    import torch

    from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
    from abmll.data import load_examples
    from abmll.models import load_base_model, resolve_device
    from abmll.scoring import ScoringConfig, make_batches, option_scores

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base, tok = load_base_model(args.model, args.dtype, device)
    model = BayesLoraModel(base, BayesLoraConfig(rank=4))
    params = model.init_params()
    examples = load_examples("ai2_arc", "test")[: args.n_score]
    out, scores = {}, {}
    for pack in (False, True):
        cfg = ScoringConfig(max_length=256, max_rows=32, pack_options=pack)
        batches = [b.to(device) for b in make_batches(tok, examples, cfg)]
        fn = lambda groups=None, **kw: model(params, groups=groups, **kw).logits  # noqa: E731
        with torch.no_grad():
            option_scores(fn, batches[0])  # warm-up
            t0 = time.perf_counter()
            got = [(b.example_index, option_scores(fn, b)) for b in batches]
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        s = torch.full((len(examples), 5), float("-inf"), device=device)
        for idx, sc in got:
            s[idx, : sc.shape[1]] = sc
        scores[pack] = s
        out["packed" if pack else "per_option"] = dict(
            examples_per_s=len(examples) / seconds, tokens=sum(int(b.input_ids.numel()) for b in batches)
        )
    finite = torch.isfinite(scores[True])
    out["max_abs_diff"] = (scores[True] - scores[False])[finite].abs().max().item()
    out["speedup"] = out["packed"]["examples_per_s"] / out["per_option"]["examples_per_s"]
    out["examples"] = len(examples)
    return out


def profile_step(args) -> list[dict]:
    """Top operators by self CPU time in one ABMLL meta-step (K = 5)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from abmll.gaussian_lora import HyperpriorConfig
    from abmll.meta import MetaConfig, meta_step

    torch.set_num_threads(args.threads)
    model, tasks, _ = setup(args)
    theta = {k: v.clone().requires_grad_() for k, v in model.init_params().items()}
    opt = torch.optim.Adam(theta.values(), lr=1e-3)
    cfg = MetaConfig(inner_steps=5, inner_lr=0.3, beta=1e-6, gamma=1e-10, n_samples=1)
    meta_step(model, theta, opt, tasks, cfg, HyperpriorConfig())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        meta_step(model, theta, opt, tasks, cfg, HyperpriorConfig())
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return [
        dict(op=e.key, self_cpu_ms=e.self_cpu_time_total / 1e3, share=e.self_cpu_time_total / total, calls=e.count) for e in rows
    ]


def run_child(args, method: str, K: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, "--child", method, str(K)] + args.passthrough
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(res: dict) -> str:
    lines = [
        f"Efficiency ({res['model']}, {res['device']}); command: `{res['command']}`",
        "",
        "Each row, and the paired timing, is reused from an earlier invocation when it is in the "
        "benchmark's cache (benchmarks/results/.efficiency-rows.jsonl, .efficiency-paired.json); "
        "delete those to measure everything again.",
        "",
        "| method | K | step time (s) | peak memory (MB) | peak - baseline (MB) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['K']} | failed: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['K']} | {r['step_s']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] - r['baseline_mb']:.0f} | {r['tokens_per_s']:.0f} |"
        )
    s, paired = res["scoring"], res["step_time_paired"]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines += [
        "",
        f"- memory_ratio_k10_k1: { {m: fmt(v) for m, v in res['memory_ratio_k10_k1'].items()} }",
        "- peak memory relative to K=1: "
        f"{ {m: {K: fmt(v) for K, v in d.items()} for m, d in res['memory_ratio_vs_k1'].items()} }",
        f"- step_time_ratio_vs_lora (K=5, ABMLL meta-step / (K+1)*B LoRA steps, median of "
        f"{len(paired['rounds'])} paired rounds in one process, {paired['examples_per_task']} support + "
        f"{paired['examples_per_task']} query examples per task): "
        f"**{fmt(res['step_time_ratio_vs_lora'])}** (the trainer's default meta-step: flipout); with the "
        f"support_nll_after logging forward (--log_support_after): "
        f"{fmt(res['step_time_ratio_vs_lora_with_log'])}; with per_batch sampling: "
        f"{fmt(res['step_time_ratio_vs_lora_per_batch'])}; per round: "
        f"{ {m: [fmt(x) for x in v] for m, v in paired['ratios'].items()} }; LoRA steps per round (s): "
        f"{[round(r['lora'], 1) for r in paired['rounds']]}",
        f"- the same ratio from the rows above (separate processes, run minutes apart, "
        f"{res['examples_per_task']['support']} + {res['examples_per_task']['query']} examples per task): "
        f"{ {m: {K: fmt(v) for K, v in d.items()} for m, d in res['step_time_ratio_vs_lora_separate_processes'].items()} }",
        f"- scoring_speedup (ai2_arc, {s['examples']} examples, packed vs per-option): "
        f"{res['scoring_speedup']:.2f}x, max |score diff| {s['max_abs_diff']:.2e}, "
        f"token positions {s['packed']['tokens']} vs {s['per_option']['tokens']}",
    ]
    if res["profile"]:
        lines += [
            "",
            "Profile of one ABMLL meta-step (K=5), top self-CPU operators:",
            "",
            "| operator | self CPU (ms) | share | calls |",
            "|---|---|---|---|",
        ]
        lines += [f"| {p['op']} | {p['self_cpu_ms']:.0f} | {p['share']:.1%} | {p['calls']} |" for p in res["profile"]]
    return "\n".join(lines) + "\n"


@dataclass
class EfficiencyArgs:
    """Flags of benchmarks/efficiency.py.

    Attributes:
        model: base model (a hub id, local folder or the embedded smollm2-135m-instruct).
        device: "auto", "cpu", "cuda", "cuda:1", "mps".
        dtype: base-model dtype (float32, bfloat16, float16).
        k: support / query examples per task in the per-K children.
        repeats: timed meta-steps per child (after a warm-up step).
        threads: torch intra-op threads.
        n_score: examples of the option-scoring speed test.
        tag: results go to efficiency-TAG.{json,md} (e.g. gpu).
        methods: variants run as separate processes per K: lora, abmll, abmll_log,
            abmll_per_batch, second_order.
        ks: inner steps K to run.
        child: internal: METHOD K of one child process (started by the script).
        paired_rounds: rounds of the in-process paired timing.
        paired_k: support / query examples per task in the paired timing (the trainer's
            default episode).
        only: run one part and print it: scoring, profile or paired.
        no_profile: skip the meta-step profile.
    """

    model: str = "smollm2-135m-instruct"
    device: str = "auto"
    dtype: str = "float32"
    k: int = 4
    repeats: int = 2
    threads: int = 2
    n_score: int = 64
    tag: str = ""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ks: list[int] = field(default_factory=lambda: list(KS))
    child: list[str] | None = None
    paired_rounds: int = 5
    paired_k: int = 16
    only: Literal["scoring", "profile", "paired"] | None = None
    no_profile: bool = False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    (args,) = bench_flags.parse(argv, EfficiencyArgs, script="efficiency.py", description=__doc__.splitlines()[0])
    if unknown := set(args.methods) - set(METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    args.passthrough = [
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--k",
        str(args.k),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    if args.child:
        args.method, args.k_inner = args.child[0], int(args.child[1])
        print(json.dumps(child(args)))
        return
    if args.only == "scoring":
        print(json.dumps(scoring_speed(args), indent=2))
        return
    if args.only == "profile":
        print(json.dumps(profile_step(args), indent=2))
        return
    if args.only == "paired":
        print(json.dumps(paired_step_time(args), indent=2))
        return
    name = "efficiency" + (f"-{args.tag}" if args.tag else "")
    rows, cache = [], RESULTS / f".{name}-rows.jsonl"  # finished children survive a restart
    done = {(r["method"], r["K"]): r for r in map(json.loads, cache.read_text().splitlines())} if cache.exists() else {}
    for method in args.methods:
        for K in args.ks:
            if (method, K) not in done:
                try:
                    done[(method, K)] = run_child(args, method, K)
                except subprocess.CalledProcessError as err:  # e.g. out of memory: recorded, not fatal
                    done[(method, K)] = dict(method=method, K=K, error=err.stderr.strip().splitlines()[-1:])
                with cache.open("a") as f:
                    f.write(json.dumps(done[(method, K)]) + "\n")
            rows.append(done[(method, K)])
            print(json.dumps(rows[-1]), file=sys.stderr)
    by = {(r["method"], r["K"]): r for r in rows}

    def ratio(num, den, key):
        return num[key] / den[key] if num and den and key in num and key in den else None

    def time_ratio(method, K):  # method's step / the (K + 1) * B LoRA steps of the same K
        return ratio(by.get((method, K)), by.get(("lora", K)), "step_s")

    scoring = scoring_speed(args)
    paired_cache = RESULTS / f".{name}-paired.json"  # the paired timing survives a restart too
    paired = json.loads(paired_cache.read_text()) if paired_cache.exists() else None
    if paired is None or (paired["examples_per_task"], len(paired["rounds"])) != (args.paired_k, args.paired_rounds):
        paired = paired_step_time(args)
        paired_cache.write_text(json.dumps(paired))
    import torch

    from abmll.models import resolve_device

    res = {
        "model": args.model,
        "device": str(resolve_device(args.device)) + f" ({args.dtype}, {args.threads} threads)",
        "command": bench_report.command_line("efficiency.py", argv),
        "torch": torch.__version__,
        "examples_per_task": {"support": args.k, "query": args.k},
        "memory_ratio_k10_k1": {m: ratio(by.get((m, 10)), by.get((m, 1)), "peak_mb") for m in ("abmll", "second_order")},
        "memory_ratio_vs_k1": {m: {K: ratio(by.get((m, K)), by.get((m, 1)), "peak_mb") for K in args.ks} for m in args.methods},
        "step_time_ratio_vs_lora": paired["median_ratio"]["abmll"],
        "step_time_ratio_vs_lora_with_log": paired["median_ratio"]["abmll_log"],
        "step_time_ratio_vs_lora_per_batch": paired["median_ratio"]["abmll_per_batch"],
        "step_time_paired": paired,
        "step_time_ratio_vs_lora_separate_processes": {
            m: {K: time_ratio(m, K) for K in args.ks} for m in args.methods if m != "lora"
        },
        "scoring_speedup": scoring["speedup"],
        "scoring": scoring,
        "profile": [] if args.no_profile else profile_step(args),
        "rows": rows,
    }
    write(name, res)
    print(table(res))


def write(name: str, res: dict) -> None:
    """Write ``RESULTS/<name>.{json,md}``; into efficiency.{json,md}, benchmarks/top_layers.py's
    rows (efficiency-top_layers.json: all layers vs top-L cached at equal wall time) are merged
    back, so rerunning this script does not drop them."""
    bench_report.write_results(name, res, table(res), RESULTS)
    top = RESULTS / "efficiency-top_layers.json"
    if name == "efficiency" and top.is_file():
        import top_layers  # here, not at start-up: the timed child processes import this module

        top_layers.merge_into_efficiency(json.loads(top.read_text()))


if __name__ == "__main__":
    main()
