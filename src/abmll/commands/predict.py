"""``abmll predict``: predictions, uncertainty and abstention for every line of a file."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from abmll.args import PredictArgs, RunArgs
from abmll.checkpoint import write_json
from abmll.config import RunConfig, result_config
from abmll.data import Example, read_jsonl
from abmll.loading import load_prior
from abmll.meta import predict_samples
from abmll.metrics import ECE_SCHEME, compute_metrics
from abmll.outputs import (
    check_writable,
    complete_lines,
    file_digest,
    read_json_or_none,
    settings_hash,
)
from abmll.scoring import make_batches
from abmll.uncertainty import choose_threshold, decompose, normalised_entropy

PREDICTIONS, PREDICT_CONFIG = "predictions.jsonl", "predict_config.json"


def run_predict(run: RunArgs, args: PredictArgs, cfg: RunConfig) -> Path:
    """Predict every example of ``args.input`` with the adapter ``args.adapter``, averaging
    ``eval.eval_samples`` weight samples (0: posterior mean). Writes ``run.out``/predictions.jsonl
    (per line: options, probs, prediction, prediction_index; entropy = total predictive
    entropy, aleatoric (expected entropy) and epistemic (mutual information) in nats and
    normalised_entropy (over log of the number of options) and top_prob_std, see
    :func:`abmll.uncertainty.decompose`; abstain when ``--abstain_above`` is set or chosen on
    ``--abstain_dev`` for a target accuracy or coverage, recorded as ``abstain_threshold``;
    dropped_tokens (input tokens cut to fit ``max_length``); output / correct when labelled)
    and predict_config.json (resolved config, metrics when labelled, ``complete``).

    The input and the output folder are checked before the model is loaded. Predictions are
    appended chunk by chunk (each chunk's weight samples seeded from ``sample_seed`` and its
    position, so a resumed run gives the same numbers); predict_config.json says
    ``"complete": false`` until the last one, and the same command run again continues from
    there. Finished predictions of other settings are not replaced without ``--overwrite``."""
    if not args.adapter or not args.input:
        raise SystemExit("predict: --adapter DIR and --input FILE.jsonl are required")
    examples = read_jsonl(args.input, unlabelled=True)
    if cfg.scoring.demonstrations and not args.support:
        raise SystemExit(
            f"predict: the adapter scores with --demonstrations {cfg.scoring.demonstrations}: "
            "pass --support FILE.jsonl (the task's labelled examples, e.g. the file given to abmll adapt)"
        )
    support = read_jsonl(args.support) if cfg.scoring.demonstrations else None
    dev = read_jsonl(args.abstain_dev) if args.abstain_dev else []
    labelled = [ex.label >= 0 for ex in examples]
    out = check_writable(run.out)
    n_samples = cfg.eval.eval_samples
    adapter_files = sorted(p for p in Path(args.adapter).iterdir() if p.suffix in (".safetensors", ".json"))
    settings = settings_hash(
        {
            "config": result_config(cfg),
            "adapter": file_digest(adapter_files),
            "input": file_digest([args.input]),
            **({"support": file_digest([args.support])} if support is not None else {}),
            "eval_samples": n_samples,
            "sample_seed": args.sample_seed,
            "chunk_size": args.chunk_size,
            "abstain_above": args.abstain_above,
            "abstain_on": args.abstain_on,
            **(
                {"abstain_dev": file_digest([args.abstain_dev]), "targets": [args.target_accuracy, args.target_coverage]}
                if dev
                else {}
            ),
        }
    )
    config_path, pred_path = out / PREDICT_CONFIG, out / PREDICTIONS
    previous = read_json_or_none(config_path) or {}
    resumable = previous.get("settings") == settings and previous.get("complete") is False
    if (previous or pred_path.exists()) and not resumable and not run.overwrite:
        state = "complete" if previous.get("complete") else "of other settings" if previous else "of unknown settings"
        raise ValueError(
            f"--out {out} already holds predictions ({PREDICTIONS}, {state}); pass --overwrite to "
            "replace them or choose another --out"
        )
    done_lines = complete_lines(pred_path) if resumable else []
    done = len(done_lines) - len(done_lines) % args.chunk_size  # whole chunks only
    model, tokenizer, params, status = load_prior(args.adapter, cfg)
    device = next(model.parameters()).device
    record = {
        **cfg.to_dict(),
        "adapter": str(args.adapter),
        "input": str(args.input),
        "input_resolved": str(Path(args.input).resolve()),  # the file read, wherever the command ran
        **({"support": str(args.support)} if support is not None else {}),
        "eval_samples": n_samples,
        "sample_seed": args.sample_seed,
        "abstain_above": args.abstain_above,
        "abstain_on": args.abstain_on,
        "n": len(examples),
        "labelled": sum(labelled),
        "settings": settings,
    }
    if status is not None:
        record.update(prior=status, prior_complete=status["complete"])
    write_json(config_path, {**record, "complete": False})
    with open(pred_path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in done_lines[:done])
    if done:
        print(f"resuming: {done} prediction(s) already in {pred_path}")
    predict = partial(_predict_chunk, model, tokenizer, params, cfg, support, device)
    threshold = args.abstain_above
    if args.abstain_dev:
        record["abstain_threshold"] = _dev_threshold(predict, dev, args)
        threshold = record["abstain_threshold"]["threshold"]
        write_json(config_path, {**record, "complete": False})
    abstain = None if threshold is None else (args.abstain_on, threshold)
    bar = tqdm(total=len(examples), initial=done, desc=f"predict ({n_samples} samples)", unit="ex")
    truncated = 0
    for i in range(done, len(examples), args.chunk_size):
        chunk = examples[i : i + args.chunk_size]
        samples, parts, dropped = predict(chunk, args.sample_seed * 1_000_003 + i)
        lines = [
            _prediction_line(ex, p[: len(ex.options)], has_label, int(d), {k: float(v[j]) for k, v in parts.items()}, abstain)
            for j, (ex, p, has_label, d) in enumerate(zip(chunk, samples.mean(0), labelled[i : i + len(chunk)], dropped))
        ]
        truncated += int((dropped > 0).sum())
        with open(pred_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        bar.update(len(chunk))
    bar.close()
    if truncated:
        print(
            f"warning: {truncated} input(s) were cut from the left to fit max_length={cfg.scoring.max_length} "
            "tokens (dropped_tokens > 0 in their lines); raise --max_length to keep more",
            file=sys.stderr,
        )
    summary = _prediction_metrics(pred_path) if all(labelled) else {}
    if threshold is not None:
        summary["selective"] = selective_summary([json.loads(line) for line in complete_lines(pred_path)])
    write_json(config_path, {**record, **summary, "complete": True})
    if "metrics" in summary:
        m = summary["metrics"]
        print(f"accuracy {m['accuracy']:.3f}  ECE {m['ece']:.3f}  NLL {m['nll']:.3f}  ({len(examples)} examples)")
    if "selective" in summary:
        sel = summary["selective"]
        acc = sel["selective_accuracy"]
        print(
            f"abstained on {sel['abstained']} of {len(examples)} ({args.abstain_on} > {threshold:.4g}): coverage "
            f"{sel['coverage']:.3f}"
            + (f", accuracy on the kept {acc:.3f} ({sel['kept_labelled']} labelled)" if acc is not None else "")
        )
    print(f"predictions saved to {pred_path}")
    return pred_path


def _predict_chunk(model, tokenizer, params, cfg: RunConfig, support, device, examples: list[Example], seed: int):
    """``examples`` predicted with ``cfg.eval.eval_samples`` weight samples seeded by ``seed``:
    (sample probs (S, N, C), :func:`abmll.uncertainty.decompose` parts plus "normalised", each
    (N,), dropped input tokens (N,))."""
    batches = [b.to(device) for b in make_batches(tokenizer, examples, cfg.scoring, support)]
    torch.manual_seed(seed)
    samples, _ = predict_samples(model, params, batches, cfg.eval.eval_samples)
    parts = decompose(samples)
    parts["normalised"] = normalised_entropy(parts["total"], torch.tensor([len(ex.options) for ex in examples]))
    dropped = torch.zeros(len(examples), dtype=torch.long)
    for b in batches:
        dropped[b.example_index] = b.dropped_tokens.cpu()
    return samples, parts, dropped


def _dev_threshold(predict, dev: list[Example], args: PredictArgs) -> dict:
    """The abstention threshold meeting ``args``' target on the labelled ``dev`` rows
    (:func:`abmll.uncertainty.choose_threshold` on their ``args.abstain_on``), printed and
    returned with the file, the target and what it gives on those rows."""
    samples, parts, _ = predict(dev, args.sample_seed * 1_000_003 - 1)
    correct = samples.mean(0).argmax(-1) == torch.tensor([ex.label for ex in dev])
    try:
        chosen = choose_threshold(parts[args.abstain_on], correct, args.target_accuracy, args.target_coverage)
    except ValueError as err:
        raise ValueError(f"--abstain_dev {args.abstain_dev}: {err}") from None
    if args.target_accuracy is not None:
        target = {"target_accuracy": args.target_accuracy}
    else:
        target = {"target_coverage": args.target_coverage}
    print(
        f"abstention threshold chosen on {args.abstain_dev} ({chosen['rows']} rows): abstain when {args.abstain_on} > "
        f"{chosen['threshold']:.4g}; there it keeps {chosen['coverage']:.1%} at selective accuracy "
        f"{chosen['selective_accuracy']:.3f}"
    )
    return {"abstain_dev": args.abstain_dev, "abstain_on": args.abstain_on, **target, **chosen}


def _prediction_line(
    ex: Example, p: torch.Tensor, has_label: bool, dropped: int, parts: dict, abstain: tuple[str, float] | None
) -> dict:
    """One line of predictions.jsonl; probabilities to 9 significant digits (float32's own
    precision, so metrics recomputed from the file match, and a tiny probability stays > 0).
    ``abstain``: (the uncertainty kind, the threshold above which the line abstains) or None."""
    pred = int(p.argmax())
    line = {
        "input": ex.input,
        "options": list(ex.options),
        "probs": [float(f"{float(x):.9g}") for x in p],
        "prediction": ex.options[pred],
        "prediction_index": pred,
        "entropy": round(parts["total"], 6),
        "aleatoric": round(parts["aleatoric"], 6),
        "epistemic": round(parts["epistemic"], 6),
        "normalised_entropy": round(parts["normalised"], 6),
        "top_prob_std": round(parts["top_prob_std"], 6),
        "dropped_tokens": dropped,
    }
    if abstain is not None:
        line["abstain"] = parts[abstain[0]] > abstain[1]
    if has_label:
        line.update(output=ex.options[ex.label], correct=pred == ex.label)
    return line


def selective_summary(lines: list[dict]) -> dict:
    """Coverage and selective accuracy of predictions.jsonl lines carrying ``abstain``:
    ``{"kept", "abstained", "coverage" (kept / all), "kept_labelled", "selective_accuracy"
    (share correct among the kept labelled lines; None when there is none)}``."""
    kept = [line for line in lines if not line["abstain"]]
    judged = [line for line in kept if "correct" in line]
    return {
        "kept": len(kept),
        "abstained": len(lines) - len(kept),
        "coverage": len(kept) / len(lines) if lines else 0.0,
        "kept_labelled": len(judged),
        "selective_accuracy": sum(line["correct"] for line in judged) / len(judged) if judged else None,
    }


def _prediction_metrics(path: Path) -> dict:
    """Metrics of a labelled predictions.jsonl (probabilities as written, padded to the widest)."""
    lines = [json.loads(line) for line in complete_lines(path)]
    width = max(len(line["probs"]) for line in lines)
    probs = torch.tensor([line["probs"] + [0.0] * (width - len(line["probs"])) for line in lines])
    labels = torch.tensor([line["options"].index(line["output"]) for line in lines])
    return {"metrics": compute_metrics(probs, labels), "ece_scheme": ECE_SCHEME}
