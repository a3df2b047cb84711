#!/bin/bash
# Issue 26 item 2: adapter plus in-context demonstrations, measured: zero-shot and LoRA (the
# table of record's recipe) with m = 0, 2, 4 support examples in the prompt, max_length 256 so
# that they fit, on the 11 class_to_class test tasks, seed 100. A measurement, not a selection
# (choosing m belongs on dev data). Resumable: each (method, task, seed, m) is cached.
cd "$(dirname "$0")/../.."
.venv/bin/python benchmarks/quality.py --split class_to_class --methods zero_shot lora --max_test 64 --eval_samples 4 \
  --threads 2 --test_k 16 --seeds 100 --adaptation lora=adamw:10:0.01 --max_length 256 \
  --sweep demonstrations=0,2,4 --out_dir runs/c2c-demos --work_dir runs/c2c-demos
