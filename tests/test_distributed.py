"""Multi-process meta-training (abmll.distributed): 2 CPU processes (gloo) under `accelerate launch`
train the same prior as 1 process; failures stop or skip in every process; FSDP2 sharding of the
base model from configs/accelerate_fsdp_8gpu.yaml."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, tiny_cli, write_task

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.checkpoint import load_adapter
from abmll.cli import main
from abmll.data import Example
from abmll.distributed import adapter_parameters, noise_seed, shard_base_model, split_batches, task_share, wrap_policy
from abmll.gaussian_lora import HyperpriorConfig
from abmll.meta import MetaConfig, TaskBatches, meta_step, predict_batches
from abmll.scoring import ScoringConfig, make_batches
from abmll.train import CHECKPOINT_DIR
from abmll.train_state import PREVIOUS_STATE, STATE

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate_fsdp_8gpu.yaml"
TOK = make_tiny_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # other jobs share the 2 cores


# ---------------------------------------------------------------- in process


def test_task_share_covers_each_task_once_and_noise_seeds_ignore_the_process():
    for world in range(1, 6):
        shares = [task_share(7, r, world) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(7))
    assert task_share(4, 1, 2) == [1, 3]
    seeds = {noise_seed(0, step, i) for step in range(5) for i in range(8)}
    assert len(seeds) == 40  # distinct per (step, task index)
    assert noise_seed(3, 2, 1) == noise_seed(3, 2, 1) != noise_seed(4, 2, 1)


def rule_examples(n: int, seed: int, options=("no", "yes")) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(3 + i % 4))
        label = i % len(options)
        out.append(Example(word + "q" * label, tuple(options), label, f"x:{i}"))
    return out


def test_split_batches_gives_exactly_n_batches_with_the_same_scores():
    torch.manual_seed(0)
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    theta = {k: v + 0.05 * torch.randn_like(v) for k, v in model.init_params().items()}
    examples = rule_examples(6, 1, ("no", "yes", "maybe"))
    config = ScoringConfig(max_rows=8)
    reference = make_batches(TOK, examples, config)
    assert len(reference) == 3  # 18 rows, at most 8 per batch
    split = split_batches(TOK, examples, config, 5)
    assert len(split) == 5
    assert sorted(i for b in split for i in b.example_index.tolist()) == list(range(6))
    probs, labels = predict_batches(model, theta, split, 0)
    ref_probs, ref_labels = predict_batches(model, theta, reference, 0)
    assert torch.equal(labels, ref_labels)
    assert (probs - ref_probs).abs().max() < 1e-6
    assert len(split_batches(TOK, examples, config, 3)) == 3
    with pytest.raises(ValueError, match="into exactly 2 batches"):
        split_batches(TOK, examples, config, 2)  # needs 3
    with pytest.raises(ValueError, match="into exactly 7 batches"):
        split_batches(TOK, examples, config, 7)  # only 6 examples


def test_meta_step_shares_sum_to_the_whole_meta_batch():
    """What the processes compute: meta_step on tasks {0, 2} and {1, 3} of a meta-batch of 4
    (weights 1/4, per-task noise seeds) sums to meta_step on all 4, weight noise included."""
    torch.manual_seed(0)
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    theta0 = {k: v + 0.05 * torch.randn_like(v) for k, v in model.init_params().items()}
    config = MetaConfig(inner_steps=2, inner_lr=0.3, n_samples=1)
    scoring = ScoringConfig(max_rows=8)
    tasks = []
    for i in range(4):
        exs = rule_examples(8, i)
        tasks.append(
            TaskBatches(
                f"t{i}", make_batches(TOK, exs[:4], scoring), make_batches(TOK, exs[4:], scoring), noise_seed=noise_seed(0, 5, i)
            )
        )

    def run(share):
        theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
        seen = {}

        def capture(theta, logs):
            seen.update(grads={k: v.grad.clone() for k, v in theta.items()}, logs=dict(logs))
            return logs

        meta_step(
            model,
            theta,
            torch.optim.SGD(theta.values(), lr=0.0),
            [tasks[i] for i in share],
            config,
            HyperpriorConfig(),
            5,
            total_tasks=4,
            reduce=capture,
        )
        return seen

    whole, first, second = run([0, 1, 2, 3]), run([0, 2]), run([1, 3])
    for k, g in whole["grads"].items():
        assert (first["grads"][k] + second["grads"][k] - g).abs().max() <= 1e-6 * g.abs().max()
    for key, value in whole["logs"].items():
        assert first["logs"][key] + second["logs"][key] == pytest.approx(value, rel=1e-6)
    assert whole["logs"]["query_nll"] > 0
    torch.manual_seed(123)  # the global RNG does not matter
    again = run([0, 2])
    assert all(torch.equal(again["grads"][k], first["grads"][k]) for k in theta0)


def test_fsdp_config_parses_and_wraps_the_decoder_layers(monkeypatch):
    """configs/accelerate_fsdp_8gpu.yaml through accelerate's own config loader and launcher
    environment, into the FSDP plugin: FSDP2, full shard, bf16, one unit per LlamaDecoderLayer;
    the adapter tensors are what shard_base_model leaves out of the sharding."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    for name, kind in [
        ("accelerate_multigpu_8gpu.yaml", DistributedType.MULTI_GPU),
        ("accelerate_cpu_2proc.yaml", DistributedType.MULTI_GPU),
    ]:
        assert load_config_from_file(str(REPO / "configs" / name)).distributed_type == kind
    cfg = load_config_from_file(str(FSDP_CONFIG))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes == 8 and cfg.mixed_precision == "bf16"
    assert cfg.fsdp_config["fsdp_version"] == 2
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(FSDP_CONFIG), "train.py"]))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision("bf16")
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16

    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    policy = wrap_policy(plugin, model.peft_model)
    wrapped = [name for name, m in model.peft_model.named_modules() if policy(m)]
    assert wrapped == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert all(isinstance(model.peft_model.get_submodule(n), LlamaDecoderLayer) for n in wrapped)
    names = {id(p): n for n, p in model.peft_model.named_parameters()}
    assert sorted(names[id(p)] for p in adapter_parameters(model)) == sorted(model.init_params())


def test_fsdp_refuses_per_batch_sampling_before_sharding():
    """per_batch sampling writes the noise into W0, which FSDP would shard: a clear error, and
    the model is left untouched."""
    from types import SimpleNamespace

    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, sampling="per_batch"))
    with pytest.raises(ValueError, match="--sampling flipout"):
        shard_base_model(SimpleNamespace(), model, plugin=SimpleNamespace(fsdp_version=2))
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


# ---------------------------------------------------------------- 2 processes under accelerate launch


def cli_args(model_dir, data_dir, *extra) -> list[str]:
    flags = dict(max_query=4, meta_steps=3, meta_batch_size=4, inner_steps=2, outer_lr=0.05, save_every=2, device="cpu")
    return ["meta-train", *tiny_cli(model_dir, data_dir, **flags, plots=False), *extra]


# The launched script: one thread, and the same torch seed as the in-process reference (the
# adapter initialisation draws from it; process 0's draw is broadcast to the others).
RUN = """import sys, torch
torch.set_num_threads(1)
torch.manual_seed(0)
{patch}
from abmll.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, args: list[str], *launch_args: str, patch: str = "", timeout: int = 240):
    """``accelerate launch`` (torchrun under the hood) of ``abmll meta-train args`` in 2 processes."""
    script = tmp_path / "run_abmll.py"
    script.write_text(RUN.format(patch=patch))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch_args,
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(script),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def reference_run(out, args) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    assert main([*args, "--out", str(out)]) == 0
    return load_adapter(out)[0]


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_train_the_same_prior_as_one(tiny_model_dir, tiny_data_dir, tmp_path):
    args = cli_args(tiny_model_dir, tiny_data_dir, "--split", "tiny", "--n_samples", "1")
    one = reference_run(tmp_path / "one", args)
    proc = launch(tmp_path, [*args, "--out", str(tmp_path / "two")], "--multi_gpu", "--mixed_precision", "no")
    assert proc.returncode == 0, proc.stderr[-3000:]

    two, saved = load_adapter(tmp_path / "two")
    assert saved["meta_steps_done"] == 3
    assert max_diff(one, two) <= 1e-5
    assert any(two[k].abs().sum() > 0 for k in two if "lora_B" in k)  # trained, not the init
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    reference = json.loads((tmp_path / "one" / "history.json").read_text())
    assert [h["tasks"] for h in history] == [h["tasks"] for h in reference]  # same meta-batches
    for h, r in zip(history, reference):  # logs averaged over processes
        assert h["query_nll"] == pytest.approx(r["query_nll"], rel=1e-5)
        assert h["kl"] == pytest.approx(r["kl"], rel=1e-5)
    assert proc.stdout.count("meta-training on 4 tasks: t0, t1, t2, t3 (2 processes)") == 1  # main prints
    saved_states = {STATE, PREVIOUS_STATE, "state-00000002.safetensors", "state-00000003.safetensors"}  # newest + previous
    assert {p.name for p in (tmp_path / "two" / CHECKPOINT_DIR).iterdir()} == saved_states  # one writer: no extra files

    # --resume in 2 processes (both read the checkpoint) continues like 1 process does
    more = [*args, "--meta_steps", "4", "--resume"]
    assert main([*more, "--out", str(tmp_path / "one")]) == 0
    proc = launch(tmp_path, [*more, "--out", str(tmp_path / "two")], "--multi_gpu", "--mixed_precision", "no")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resuming") == 1
    two, saved = load_adapter(tmp_path / "two")
    assert saved["meta_steps_done"] == 4
    assert max_diff(load_adapter(tmp_path / "one")[0], two) <= 1e-5


# Process 1's share of meta-step 1 gets NaN option scores.
POISON = """import abmll.meta, abmll.train
real_step, real_scores = abmll.train.distributed_meta_step, abmll.meta.option_scores
poisoned = [False]
def step(acc, *args, **kwargs):
    poisoned[0] = args[-1] == 1 and acc.process_index == 1
    try:
        return real_step(acc, *args, **kwargs)
    finally:
        poisoned[0] = False
abmll.train.distributed_meta_step = step
abmll.meta.option_scores = lambda *a, **kw: real_scores(*a, **kw) * (float("nan") if poisoned[0] else 1.0)
"""


def test_a_nonfinite_loss_in_one_process_stops_or_skips_in_all(tiny_model_dir, tiny_data_dir, tmp_path):
    args = cli_args(tiny_model_dir, tiny_data_dir, "--split", "tiny", "--save_every", "1")
    proc = launch(
        tmp_path,
        [*args, "--out", str(tmp_path / "skip"), "--skip_nonfinite"],
        "--multi_gpu",
        "--mixed_precision",
        "no",
        patch=POISON,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "skip" / "history.json").read_text())
    assert [h.get("skipped", False) for h in history] == [False, True, False]
    assert "support NLL nan" in history[1]["error"] and "(in process 1)" in history[1]["error"]
    assert load_adapter(tmp_path / "skip")[1]["meta_steps_skipped"] == 1  # and theta in sync at the end

    proc = launch(tmp_path, [*args, "--out", str(tmp_path / "stop")], "--multi_gpu", "--mixed_precision", "no", patch=POISON)
    assert proc.returncode != 0  # no process hangs
    assert "abmll meta-train: error: meta-step 1" in proc.stderr and "(in process 1)" in proc.stderr
    assert load_adapter(tmp_path / "stop")[1]["meta_steps_done"] == 1  # last good checkpoint


# Records, in process 0, what shard_base_model did and how often episodes were re-split.
SPY = """import json, abmll.distributed, abmll.train
from torch.distributed.tensor import DTensor
real_shard, real_split = abmll.distributed.shard_base_model, abmll.train.split_batches
splits = [0]
def split(*a, **kw):
    splits[0] += 1
    return real_split(*a, **kw)
def shard(acc, model, plugin=None):
    units = real_shard(acc, model, plugin)
    params = dict(model.peft_model.named_parameters())
    keys = set(model.init_params())
    if acc.is_main_process:
        json.dump({"units": [type(u).__name__ for u in units],
                   "base_dtensors": all(isinstance(p, DTensor) for n, p in params.items() if n not in keys),
                   "adapter_plain": not any(isinstance(params[k], DTensor) for k in keys)},
                  open(SPY_FILE, "w"))
    return units
abmll.distributed.shard_base_model, abmll.train.split_batches = shard, split
import atexit
atexit.register(lambda: json.dump(splits[0], open(SPY_FILE + ".splits." + str(__import__("os").environ["RANK"]), "w")))
"""


def test_fsdp_two_processes_shard_the_base_and_run_in_lockstep(tiny_model_dir, tiny_data_dir, tmp_path):
    """FSDP2 from configs/accelerate_fsdp_8gpu.yaml on 2 CPU processes (bf16 off: CPU): the
    base weights are sharded, the adapters are not. One task has 3 options, so its episodes
    need 2 batches where the others need 1: the others are re-split so that both processes run
    the same number of forward passes (without that, FSDP's all-gathers deadlock)."""
    rng = random.Random(5)
    rows = lambda: [
        (w, ["no", "yes", "maybe"][i % 3])
        for i, w in enumerate("".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(4))  # noqa: E731
    ]
    write_task(
        tiny_data_dir,
        "t4",
        {f"4_{s}_{part}": rows() for s in (1, 2) for part in ("train", "dev")},
        options=("no", "yes", "maybe"),
    )
    args = cli_args(tiny_model_dir, tiny_data_dir, "--train_tasks", "t0", "t1", "t2", "t4", "--n_samples", "0")
    one = reference_run(tmp_path / "one", args)
    spy = tmp_path / "spy.json"
    proc = launch(
        tmp_path,
        [*args, "--out", str(tmp_path / "fsdp")],
        "--config_file",
        str(FSDP_CONFIG),
        "--mixed_precision",
        "no",
        patch=f"SPY_FILE = {str(spy)!r}\n" + SPY,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    sharded = json.loads(spy.read_text())
    assert sharded == {
        "units": ["FSDPLlamaDecoderLayer", "FSDPLlamaDecoderLayer", "FSDPPeftModel"],
        "base_dtensors": True,
        "adapter_plain": True,
    }
    assert sum(json.loads(Path(f"{spy}.splits.{r}").read_text()) for r in (0, 1)) > 0  # lockstep re-splits
    fsdp, saved = load_adapter(tmp_path / "fsdp")
    assert saved["meta_steps_done"] == 3
    assert max_diff(one, fsdp) <= 5e-5  # same prior; the re-split batches differ in padding only
