#!/bin/bash
# Issue 26 item 3: the prior's scale c, beta and K at ~250 meta-steps, chosen on meta-validation NLL.
# Resumable: rerun this script; priors checkpoint every 25 steps under runs/prior-grid.
cd "$(dirname "$0")/../.."
COMMON="--split class_to_class --methods abmll --meta_steps 250 --val_tasks tweet_eval-irony glue-mrpc ethos-directed_vs_generalized superglue-wic --validate_every 50 --max_test 64 --eval_samples 4 --threads 2 --save_every 25 --test_k 16 --seeds 100 --max_test_tasks 1 --adaptation abmll=adamw:10:0.01 --kinds abmll --grid 0.001:25:1.0 --work_dir runs/prior-grid"
run() { name=$1; shift; [ -f runs/prior-grid/$name/tune_outer-class_to_class.json ] && { echo "=== $name done"; return; }; echo "=== $name $(date -u +%FT%TZ)"; .venv/bin/python benchmarks/tune_outer.py $COMMON --out_dir runs/prior-grid/$name "$@" || echo "FAILED $name"; }
run c0.6 --init_std_factor 0.6
run c0.3-beta1e-5 --init_std_factor 0.3 --beta 1e-5
run c0.3-K4 --init_std_factor 0.3 --inner_steps 4
run c1.0 --init_std_factor 1.0
run c2.0 --init_std_factor 2.0
run c0.3-beta1e-7 --init_std_factor 0.3 --beta 1e-7
echo "=== done $(date -u +%FT%TZ)"
