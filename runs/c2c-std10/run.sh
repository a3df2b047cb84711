#!/bin/bash
# Issue 26 item 3: the prior grid's chosen setting (c = init_std_factor 1.0, lowest meta-validation
# NLL at 250 meta-steps, benchmarks/results/prior-grid-class_to_class.md) trained at the real budget
# (500 meta-steps) and evaluated on the class_to_class test tasks with the table of record's settings.
# Resumable: rerun this script (prior checkpoints every 25 steps; each (method, task, seed) cached).
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-100 13 21 42 87}
.venv/bin/python benchmarks/quality.py --split class_to_class --methods abmll abmll_ts \
  --outer_lr 0.001 --meta_steps 500 --val_tasks tweet_eval-irony glue-mrpc ethos-directed_vs_generalized superglue-wic \
  --validate_every 50 --max_test 64 --eval_samples 4 --threads 2 --save_every 25 --test_k 16 --seeds $SEEDS \
  --adaptation abmll=adamw:10:0.01 --outer abmll=0.001:25:1.0 --init_std_factor 1.0 \
  --work_dir runs/c2c-std10 --out_dir runs/c2c-std10
