#!/bin/bash
# Issue 26 item 1: channel probabilities calibrated by length normalisation. In channel mode every
# option scores the same input tokens, so the mean over them is the summed score divided by one
# count per example (a per-example temperature): zero-shot on the 11 class_to_class test tasks,
# seed 100, as quality-class_to_class-channel-s100.md but with --length_normalize true.
# Resumable: rerun this script (each (method, task, seed) cached in runs/c2c-channel-ln).
cd "$(dirname "$0")/../.."
.venv/bin/python benchmarks/quality.py --split class_to_class --methods zero_shot --max_test 64 --eval_samples 4 \
  --threads 2 --test_k 16 --seeds 100 --channel true --length_normalize true \
  --work_dir runs/c2c-channel-ln --out_dir runs/c2c-channel-ln
