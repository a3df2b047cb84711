#!/bin/bash
# Issue 27: the calibration baselines on the class_to_class table of record (its cache and
# priors in runs/quality-class_to_class are reused: only the new methods run). Resumable:
# rerun this script; each (method, task, seed) is cached as it finishes. SEEDS defaults to 100.
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-100}  # LIN=1 adds laplace_lora_lin (the linearised Laplace predictive)
.venv/bin/python benchmarks/quality.py --split class_to_class \
  --methods abmll lora multitask_lora zero_shot bayes_lora reptile lora_ts multitask_lora_ts abmll_ts lora_ensemble lora_mc_dropout laplace_lora ${LIN:+laplace_lora_lin} lora_ts_support abmll_ts_support \
  --outer_lr 0.001 --meta_steps 500 --val_tasks tweet_eval-irony glue-mrpc ethos-directed_vs_generalized superglue-wic \
  --validate_every 50 --max_test 64 --eval_samples 4 --threads 2 --save_every 25 --test_k 16 --seeds $SEEDS \
  --adaptation abmll=adamw:10:0.01 bayes_lora=adamw:10:0.01 lora=adamw:10:0.01 multitask_lora=adamw:10:0.003 reptile=adamw:10:0.003 \
  --outer abmll=0.001:25:1.0 multitask=0.003:25:1.0 reptile=0.003:25:1.0 \
  --work_dir runs/quality-class_to_class --out_dir runs/c2c-calibration
