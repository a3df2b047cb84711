"""Multi-process meta-training with accelerate: the tasks of each meta-batch split across processes.

Launched with ``accelerate launch`` (or ``torchrun``), every process builds the same trainer and

- samples the **same** meta-batch (the task sampler is seeded identically everywhere, so its
  state stays identical and resumable), and runs only its share of it: tasks r, r + W, r + 2W,
  ... for process r of W (:func:`task_share`);
- seeds the weight noise of task i of meta-step s with :func:`noise_seed` (seed, s, i), so a
  task draws the same noise whichever process runs it: W processes compute exactly the gradient
  of one process, up to the order of a floating-point sum;
- sums the per-task gradient contributions (each already weighted 1/B for the whole
  meta-batch) and the logs over the processes (:class:`ProcessReducer`, one all-reduce of the
  adapter gradients: a few MB), then adds the hyperprior gradient once, checks finiteness and
  steps Adam; all processes hold the same numbers, so they take the same decisions and keep
  the same theta (it is broadcast from process 0 once, at the start);
- stops together: a process that fails before the all-reduce tells the others, which raise
  too (:func:`distributed_meta_step`), so no process waits forever in a collective.

Only the main process writes checkpoints, the prior, history.json, plots and progress bars.

Large base models: with an FSDP configuration (``configs/accelerate_fsdp_8gpu.yaml``),
:func:`shard_base_model` shards the frozen base weights with FSDP2 (``fully_shard``) along the
plugin's wrap policy (one unit per decoder layer) and leaves the adapter tensors out of the
sharding, whole on every process, so ``functional_call`` can substitute theta and the task
posteriors as on one device. FSDP gathers each layer's weights in every forward and backward,
a collective: all processes must then run the same number of passes in each meta-step, which
:func:`lockstep_counts` and :func:`split_batches` arrange (the same number of tasks per process
and of batches per support / query set). For the same reason a failure inside one process's
inner loop cannot be signalled cleanly under FSDP (the others are inside FSDP's gathers): the
run then ends on the collective timeout.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import torch
from torch import nn

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.gaussian_lora import HyperpriorConfig
from abmll.meta import MetaConfig, NonFiniteLossError, TaskBatches, meta_step
from abmll.outputs import tensor_digest
from abmll.scoring import OptionBatch, ScoringConfig, encode_options

LAUNCH_ENV = "WORLD_SIZE"
"""Set (to the number of processes) by ``accelerate launch`` / ``torchrun`` in every process."""


def launched_processes() -> int:
    """Number of processes this one was launched with (1 without a launcher)."""
    return int(os.environ.get(LAUNCH_ENV, "1"))


def make_accelerator(device: str = "auto"):
    """The run's ``accelerate.Accelerator`` when launched with several processes, else None.

    It initialises the process group (NCCL on GPUs, gloo on CPU) and gives each process its
    device (``cuda:<local rank>``). ``device`` "cpu", or a machine without CUDA, runs the
    processes on CPU. A single process needs no accelerator: the trainer runs as it always did.
    """
    if launched_processes() < 2:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=str(device) == "cpu" or not torch.cuda.is_available())


def fsdp_plugin(accelerator):
    """The accelerate FSDP plugin of this launch (an FSDP config), else None. On CPU accelerate
    does not activate FSDP itself, so the plugin is then built from the launcher's ``FSDP_*``
    environment, the same settings."""
    if accelerator is None:
        return None
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":  # as accelerate does for its own FSDP plugin
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
    return plugin


def base_model_device(accelerator, requested: str) -> str | torch.device:
    """Where to load the base model: ``requested`` without an accelerator; "cpu" under FSDP
    (:func:`shard_base_model` then moves each process's shards to its device); else the
    process's own device."""
    if accelerator is None:
        return requested
    return "cpu" if fsdp_plugin(accelerator) is not None else accelerator.device


# ------------------------------------------------------------------------ task split and noise


def task_share(n_tasks: int, rank: int, world_size: int) -> list[int]:
    """Indices of the meta-batch's tasks that process ``rank`` of ``world_size`` runs:
    rank, rank + W, rank + 2W, ... (every task exactly once over the processes)."""
    return list(range(rank, n_tasks, world_size))


def noise_seed(seed: int, step: int, index: int) -> int:
    """Seed of the weight noise of task ``index`` of meta-step ``step`` (run seed ``seed``): a
    function of these three numbers only, not of the process that runs the task."""
    return random.Random(f"abmll-noise/{seed}/{step}/{index}").getrandbits(63)


def broadcast_params(accelerator, params: Params, from_process: int = 0) -> None:
    """Copy ``params`` of process ``from_process`` into every process's ``params`` (in place)."""
    from accelerate.utils import broadcast

    with torch.no_grad():
        for t in params.values():
            t.copy_(broadcast(t.detach().clone(), from_process))


def check_in_sync(accelerator, params: Params) -> None:
    """Raise RuntimeError unless ``params`` are bitwise identical in every process."""
    from accelerate.utils import gather_object

    digests = gather_object([tensor_digest(params)])
    if len(set(digests)) > 1:
        raise RuntimeError(f"the processes hold different adapter tensors (digests {digests})")


# ------------------------------------------------------------------------ the meta-step


class ProcessReducer:
    """The ``reduce`` hook of :func:`abmll.meta.meta_step` for several processes: sums the
    adapter gradients and the logs over the processes, so every process continues with the
    whole meta-batch's gradient. A process that failed instead calls :meth:`fail`; the
    collectives of both paths match, and every process then raises.

    Collectives, in order: a failure count (all-reduce); then either the error messages
    (all-gather) or the gradients (one all-reduce of all adapter gradients, flattened) and the
    logs (one all-reduce, float64).
    """

    def __init__(self, accelerator, step: int) -> None:
        self.accelerator = accelerator
        self.step = step
        self.called = False

    def __call__(self, theta: Params, logs: dict[str, float]) -> dict[str, float]:
        self.called = True
        self._check(None)
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in theta.values()]
        total = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
        for t, g in zip(theta.values(), total.split([g.numel() for g in grads])):
            t.grad = g.view_as(t).clone()
        device = next(iter(theta.values())).device
        values = self.accelerator.reduce(torch.tensor(list(logs.values()), dtype=torch.float64, device=device), reduction="sum")
        return dict(zip(logs, values.tolist()))

    def fail(self, err: BaseException) -> None:
        """Tell the other processes that this one failed (it re-raises ``err`` itself)."""
        self.called = True
        self._check(err)

    def _check(self, err: BaseException | None) -> None:
        from accelerate.utils import gather_object

        device = self.accelerator.device
        failed = self.accelerator.reduce(torch.tensor([float(err is not None)], device=device), reduction="sum")
        if failed.item() == 0:
            return
        mine = [(self.accelerator.process_index, type(err).__name__, str(err))] if err is not None else []
        errors = gather_object(mine)
        if err is not None:
            return
        rank, kind, message = errors[0]
        if kind == NonFiniteLossError.__name__:
            raise NonFiniteLossError(f"{message} (in process {rank})")
        raise RuntimeError(f"meta-step {self.step}: process {rank} failed with {kind}: {message}")


def distributed_meta_step(
    accelerator,
    model: BayesLoraModel,
    theta: Params,
    optimizer: torch.optim.Optimizer,
    tasks: Sequence[TaskBatches],
    total_tasks: int,
    config: MetaConfig,
    hyper: HyperpriorConfig,
    step: int,
    log_support_after: bool = False,
) -> dict[str, float]:
    """:func:`abmll.meta.meta_step` on this process's ``tasks`` (its share of a meta-batch of
    ``total_tasks``), with gradients and logs summed over the processes before the hyperprior,
    the finiteness check and the optimizer step. Returns the logs of the whole meta-batch,
    identical on every process.

    Raises:
        NonFiniteLossError: in every process when a loss or gradient of any process is NaN/inf
            (the message names the failing process); theta is left unchanged everywhere.
        RuntimeError: in the other processes when one failed with another error (that one
            raises its own).
    """
    reducer = ProcessReducer(accelerator, step)
    try:
        return meta_step(
            model,
            theta,
            optimizer,
            tasks,
            config,
            hyper,
            step,
            total_tasks=total_tasks,
            reduce=reducer,
            log_support_after=log_support_after,
        )
    except Exception as err:
        optimizer.zero_grad(set_to_none=True)
        if not reducer.called:  # failed before the all-reduce: the others are waiting in it
            reducer.fail(err)
        raise


# ------------------------------------------------------------------------ FSDP for large base models


def wrap_policy(plugin, module: nn.Module):
    """The plugin's auto-wrap policy for ``module`` as a predicate ``policy(submodule) -> bool``
    (True: the submodule becomes an FSDP unit), or None for no auto wrap."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin.set_auto_wrap_policy(module)
    return fsdp2_prepare_auto_wrap_policy(plugin, module)


def adapter_parameters(model: BayesLoraModel) -> list[nn.Parameter]:
    """The adapter slots of ``model`` (the keys of its theta), which FSDP must leave alone."""
    keys = {k for L in model.layers for k in (L.mean_A, L.mean_B, L.scale_A, L.scale_B)}
    return [p for name, p in model.peft_model.named_parameters() if name in keys]


def shard_base_model(accelerator, model: BayesLoraModel, plugin=None) -> list[nn.Module]:
    """Shard the frozen base weights of ``model`` over the processes with FSDP2, in place.

    Follows the accelerate FSDP ``plugin`` (default: :func:`fsdp_plugin`): its wrap policy
    (e.g. one unit per ``LlamaDecoderLayer``), ``reshard_after_forward`` (FULL_SHARD), CPU
    offload and mixed precision (``mixed_precision: bf16``: weights gathered and computed in
    bf16). The adapter tensors are ``ignored_params``: not sharded, not cast, moved whole to
    the process's device, so ``functional_call`` substitutes theta / lambda exactly as on one
    device, and parameter names are unchanged (FSDP2 shards in place).

    Returns the modules made FSDP units (the wrapped layers, then the root ``peft_model``).
    Raises:
        ValueError: no FSDP plugin, or an FSDP1 config (``fsdp_version: 1``, flat parameters:
            not supported; FSDP2 keeps parameter names, which ``functional_call`` relies on),
            or ``sampling="per_batch"`` (it adds the noise to W0 itself, which FSDP shards).
    The frozen-layer cache (``top_layers``) is turned off: processes that hit and miss it would
    run different numbers of collectives.
    """
    from accelerate.utils.other import get_module_children_bottom_up
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = plugin or fsdp_plugin(accelerator)
    if plugin is None:
        raise ValueError("shard_base_model needs an accelerate FSDP config (see configs/accelerate_fsdp_8gpu.yaml)")
    if plugin.fsdp_version != 2:
        raise ValueError("abmll shards the base model with FSDP2 only: set fsdp_version: 2 in the accelerate config")
    if model.config.sampling != "flipout":
        raise ValueError(
            f"sampling={model.config.sampling!r} adds weight noise to the base weights, which FSDP "
            "shards: use --sampling flipout with an FSDP config"
        )
    model.drop_frozen_cache()  # hits on some processes and misses on others would hang FSDP
    root = model.peft_model
    device = accelerator.device
    ignored = set(adapter_parameters(model))
    kwargs = dict(
        mesh=init_device_mesh(device.type, (accelerator.num_processes,)),
        reshard_after_forward=plugin.reshard_after_forward,
        offload_policy=plugin.cpu_offload,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        ignored_params=ignored,
    )
    policy = wrap_policy(plugin, root)
    units = [m for m in get_module_children_bottom_up(root)[:-1] if policy is not None and policy(m)]
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(root, **kwargs)
    with torch.no_grad():
        for p in ignored:
            p.data = p.data.to(device)
    return units + [root]


def lockstep_counts(accelerator, counts: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (support, query) batch counts every process uses for its tasks this meta-step: the
    largest over all processes of this process's ``counts`` (one (support, query) pair per task)."""
    from accelerate.utils import gather_object

    everyone = gather_object([tuple(c) for c in counts])
    return max(s for s, _ in everyone), max(q for _, q in everyone)


def split_batches(tokenizer, examples: Sequence, config: ScoringConfig, n: int) -> list[OptionBatch]:
    """``examples`` as exactly ``n`` :class:`OptionBatch` es: the grouping of
    :func:`abmll.scoring.make_batches` (similar lengths, at most ``max_rows`` rows), then the
    group with the most rows split in two until there are ``n``.

    Raises:
        ValueError: fewer examples than ``n``, or ``n`` below the number of batches of at most
            ``max_rows`` rows that the examples need.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input))
    groups, rows = [[]], 0
    for i in order:
        size = len(examples[i].options)
        if groups[-1] and rows + size > config.max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += size
    if len(groups) > n or len(examples) < n:
        raise ValueError(
            f"cannot split {len(examples)} examples ({len(groups)} batches of at most "
            f"{config.max_rows} rows) into exactly {n} batches"
        )
    while len(groups) < n:
        j = max((j for j, g in enumerate(groups) if len(g) > 1), key=lambda j: sum(len(examples[i].options) for i in groups[j]))
        g = groups.pop(j)
        groups[j:j] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return [encode_options(tokenizer, [examples[i] for i in g], config, g) for g in groups]


def prepare_model(accelerator, model: BayesLoraModel) -> BayesLoraModel:
    """Shard the base model under an FSDP config (:func:`shard_base_model`); else unchanged
    (each process holds the whole model on its device)."""
    if fsdp_plugin(accelerator) is not None:
        shard_base_model(accelerator, model)
    return model
