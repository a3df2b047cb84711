"""Every committed benchmark result's keys, derived again from its command by today's code:
the method and prior keys (:func:`harness.method_config`, :func:`harness.prior_config`) of
benchmarks/results/quality-*.json must be the ones recorded with it, so a change to how keys
are built (roles of config fields, added fields) cannot silently orphan the committed caches
and priors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import harness
import pytest
from bench_flags import parse_bench

from abmll.bayes_lora import BayesLoraConfig

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
COMMITTED = sorted(p for p in RESULTS.glob("quality-*.json") if "method_configs" in json.loads(p.read_text()))


def _rebuilt(path: Path):
    """(results, bench, cfg, train) of a committed result, its flags parsed as the script did."""
    results = json.loads(path.read_text())
    argv = shlex.split(results["command"])[2:]  # past ".venv/bin/python benchmarks/quality.py"
    bench, cfg = parse_bench(argv)
    cfg.lora = BayesLoraConfig(**results["config"]["lora"])  # resolved by the model ("auto" targets)
    return results, bench, cfg, results.get("train_tasks", [])


def test_committed_results_are_found():
    assert len(COMMITTED) >= 9  # the glob did not go empty (a moved folder would pass the test below vacuously)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_method_and_prior_keys_of_committed_results_hold(path):
    results, bench, cfg, train = _rebuilt(path)
    for method, recorded in results["method_configs"].items():
        config = harness.method_config(method, cfg, train, bench.eval_split, bench)
        assert harness.config_hash(config) == recorded, f"{path.name}: {method}'s key changed"
    for kind, log in (results.get("priors") or {}).items():
        folder = harness.prior_folder(kind, cfg, train, bench, Path("runs/x"))
        assert Path(log["folder"]).name == folder.name, f"{path.name}: prior {kind}'s key changed"
