"""Flipout vs per-batch weight sampling: cost and gradient noise, on the same real batches.

The two samplers of ``BayesLoraConfig.sampling`` draw from the same N(M, S^2) and give
unbiased gradients of the same expected NLL; they differ in cost (flipout: three extra
full-rank matmuls per adapted layer in forward + backward; per_batch: one) and in how noisy
one draw's gradient is (flipout decorrelates the sequences of a batch, per_batch gives them
all the same dW). For each sampler and episode size k, on glue-sst2's k-shot support set
with SmolLM2:
  - time of one support NLL forward + backward (median over paired rounds in one process,
    samplers run in turn), against the posterior mean (no noise, plain LoRA's cost);
  - gradient noise: over G draws of that gradient, the total variance sum_j Var(g_j) relative
    to the squared norm of the expected gradient (both unbiased estimates), separately for
    the mean pair and the scale pair, at the initial prior and at a meta-trained prior
    (``--prior``). Variance per unit of cost decides which sampler trains faster.

    .venv/bin/python benchmarks/sampling.py [--prior runs/.../prior-abmll-...]

Writes benchmarks/results/sampling.json and .md.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import bench_flags
import bench_report
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.checkpoint import load_adapter
from abmll.data import load_episode
from abmll.meta import nll_backward
from abmll.models import load_base_model
from abmll.scoring import ScoringConfig, make_batches

SAMPLERS = ("flipout", "per_batch")


def support_grad(model, params, batches, n_samples) -> dict[str, torch.Tensor]:
    """Gradient of the mean support NLL at ``params`` (one weight draw; 0 = posterior mean)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    nll_backward(model, leaves, batches, n_samples)
    return {k: v.grad for k, v in leaves.items()}


def gradient_noise(model, params, batches, draws: int) -> dict[str, float]:
    """Noise-to-signal of one draw's gradient, for the mean and the scale pair:
    tr Cov(g) / ||E g||^2, both estimated without bias from ``draws`` gradients
    (||mean||^2 - tr Cov / draws for the signal). inf: no signal detectable in ``draws`` draws."""
    grads = [support_grad(model, params, batches, 1) for _ in range(draws)]
    out = {}
    for pair, keys in (("mean_pair", model.mean_keys()), ("scale_pair", [k for k in params if k not in model.mean_keys()])):
        g = torch.stack([torch.cat([d[k].flatten() for k in keys]) for d in grads]).double()  # (draws, n)
        noise = g.var(0).sum().item()
        signal = g.mean(0).square().sum().item() - noise / draws
        out[pair] = noise / signal if signal > 0 else float("inf")
    return out


@dataclass
class SamplingArgs:
    """Flags of benchmarks/sampling.py.

    Attributes:
        ks: support examples per episode (one row per k and sampler).
        rounds: timed rounds per k (after one warm-up round); the median is reported.
        draws: gradient draws per variance estimate.
        threads: torch intra-op threads.
        prior: a meta-trained prior folder (adapter.safetensors) to measure the noise at too.
    """

    ks: list[int] = field(default_factory=lambda: [4, 16])
    rounds: int = 3
    draws: int = 12
    threads: int = 1
    prior: str | None = None


def main(argv: list[str] | None = None) -> None:
    (args,) = bench_flags.parse(argv, SamplingArgs, script="sampling.py", description=__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tok = load_base_model()
    model = BayesLoraModel(base, BayesLoraConfig(rank=4))  # the sampler is read in each forward
    priors = {"initial": model.init_params()}
    if args.prior:
        priors["meta-trained"] = {k: v for k, v in load_adapter(args.prior)[0].items() if k in priors["initial"]}
    ep = load_episode("glue-sst2", 16, 100, "dev")
    rows = []
    with sdpa_kernel(SDPBackend.MATH):
        for k in args.ks:
            batches = make_batches(tok, ep.support[:k], ScoringConfig(max_length=64, max_rows=16))
            timings = {s: [] for s in ("mean",) + SAMPLERS}
            theta = priors["initial"]
            for r in range(args.rounds + 1):  # round 0 warms up
                for s in timings:
                    if s in SAMPLERS:  # "mean" draws no noise
                        model.config = replace(model.config, sampling=s)
                    t0 = time.perf_counter()
                    support_grad(model, theta, batches, 0 if s == "mean" else 1)
                    if r:
                        timings[s].append(time.perf_counter() - t0)
            med = {s: statistics.median(v) for s, v in timings.items()}
            for s in SAMPLERS:
                model.config = replace(model.config, sampling=s)
                row = dict(k=k, sampler=s, step_s=med[s], mean_step_s=med["mean"], cost_vs_mean=med[s] / med["mean"])
                for name, params in priors.items():
                    torch.manual_seed(1)
                    row[f"noise_{name}"] = gradient_noise(model, params, batches, args.draws)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    res = {
        "model": "smollm2-135m-instruct",
        "device": f"cpu (float32, {args.threads} threads)",
        "command": bench_report.command_line("sampling.py", argv),
        "rows": rows,
    }
    lines = [
        f"Weight sampling: flipout vs per_batch ({res['model']}, {res['device']}); command: `{res['command']}`",
        "",
        "Cost: one support NLL forward + backward, relative to the posterior mean (no noise). "
        "Gradient noise: sum of per-entry variances over the squared norm of the expected gradient "
        f"(unbiased estimates from {args.draws} draws; inf: no signal detectable); lower is better.",
        "",
        "| k | sampler | step (s) | cost vs mean | "
        + " | ".join(f"noise {n} ({pair})" for n in priors for pair in ("mean pair", "scale pair"))
        + " |",
        "|---|---|---|---|" + "---|" * (2 * len(priors)),
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['sampler']} | {r['step_s']:.2f} | {r['cost_vs_mean']:.3f} | "
            + " | ".join(f"{r[f'noise_{n}'][pair]:.3g}" for n in priors for pair in ("mean_pair", "scale_pair"))
            + " |"
        )
    bench_report.write_results("sampling", res, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
