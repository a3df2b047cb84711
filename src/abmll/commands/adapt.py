"""``abmll adapt``: a task posterior from a prior and a support file."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from abmll.args import AdaptArgs, RunArgs
from abmll.config import RunConfig
from abmll.data import read_jsonl
from abmll.export import export_peft
from abmll.loading import adapter_config, load_prior
from abmll.meta import adapt, mean_nll
from abmll.outputs import guard_adapter_folder
from abmll.scoring import make_batches


def run_adapt(run: RunArgs, args: AdaptArgs, cfg: RunConfig) -> Path:
    """Adapt the prior ``args.prior`` to the examples of ``args.support`` (``eval.test_steps``
    steps of ``eval.test_optimizer`` at ``eval.test_lr`` (default ``meta.inner_lr``),
    ``meta.beta``, ``meta.n_samples``) and write the posterior
    to ``run.out`` as a PEFT LoRA folder with the abmll scale sidecar."""
    if not args.prior or not args.support:
        raise SystemExit("adapt: --prior DIR and --support FILE.jsonl are required")
    examples = read_jsonl(args.support)
    guard_adapter_folder(run.out, args.prior, run.overwrite)
    model, tokenizer, theta, status = load_prior(args.prior, cfg)
    device = next(model.parameters()).device
    support = [b.to(device) for b in make_batches(tokenizer, examples, cfg.scoring, examples)]
    meta, ev, steps = cfg.meta, cfg.eval, cfg.eval.test_steps
    torch.manual_seed(meta.seed)
    before = mean_nll(model, theta, support)
    lr = ev.adapt_lr(meta)
    print(f"adapting with {steps} {ev.test_optimizer} steps at lr {lr:g} (the prior's recipe unless set by flags)")
    bar = tqdm(total=1, desc=f"adapt ({steps} steps, {len(examples)} examples)", unit="task")
    posterior, history = adapt(
        model, theta, support, steps, lr, meta.beta, meta.n_samples, meta.inner_grad_clip, ev.test_optimizer
    )
    after = mean_nll(model, posterior, support)
    bar.update(1)
    bar.set_postfix(support_nll=f"{before:.3f}->{after:.3f}")
    bar.close()
    extra = {} if status is None else {"prior_status": status, "prior_complete": status["complete"]}
    export_peft(
        run.out,
        posterior,
        adapter_config(
            cfg,
            model,
            kind="posterior",
            prior=str(args.prior),
            support=str(args.support),
            support_nll_steps=history,
            support_nll_before=before,
            support_nll_after=after,
            **extra,
        ),
        model=model,
    )
    print(
        f"support NLL at the posterior mean: {before:.4f} (prior) -> {after:.4f} (posterior); "
        f"per step ({meta.n_samples} samples): {[round(h, 4) for h in history]}"
    )
    print(f"posterior saved to {run.out} (PEFT LoRA folder: the posterior mean; abmll_scale.safetensors: its scale)")
    return Path(run.out)
