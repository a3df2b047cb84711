"""Gaussian (Bayesian) LoRA adapters on a frozen causal LM: the ABMLL generative model.

Method doc sections "Generative model" and "Sampling dW in the forward pass"
(Zhang, Snell & Griffiths 2025, arXiv 2508.14285; Ravi & Beatson 2019 for the hyperprior).

Per adapted linear layer with frozen weight W0 (d_out x d_in), four LoRA matrices:

    M = (alpha / r) * B_mu @ A_mu                  mean of dW        (d_out x d_in)
    S = softplus(B_s @ A_s + rho0)                 elementwise std   (d_out x d_in)
    rho0 = softplus^-1(c * std(W0))

The same four-matrix parameterisation is used for the prior p_theta and for every task
posterior q_lambda. The mean pair lives in peft's own ``lora_A`` / ``lora_B`` modules (peft
does target matching, Linear / Conv1D coverage and the mean path); the scale pair is added
beside them as ``bayes_scale_A`` / ``bayes_scale_B``. Weight noise enters either through a
forward hook that adds flipout noise (one sample per sequence) or, with
``sampling="per_batch"``, as one sample S * E added to W0 before the layer runs.
Every adapter tensor is addressable in one flat dict keyed by
its parameter name in the peft model, so a trainer runs task-specific copies through
``torch.func.functional_call`` without copying the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.func import functional_call

from abmll.checks import above, at_least, seeds
from abmll.gaussian_lora import (
    HyperpriorConfig,
    inverse_softplus,
    layer_kl,
    layer_neg_log_hyperprior,
    std_matrix,
)
from abmll.layer_cache import FrozenLayerCache
from abmll.roles import MACHINE, setting
from abmll.targets import (
    check_target_layers,
    decoder_position,
    peft_lora_config,
    resolve_target_modules,
    top_layer_indices,
)

Params = dict[str, Tensor]

LORA_A = "lora_A.default.weight"
LORA_B = "lora_B.default.weight"
SCALE_A = "bayes_scale_A"
SCALE_B = "bayes_scale_B"


SAMPLING = ("flipout", "per_batch")


def check_sampling(sampling: str) -> None:
    """Raises ValueError unless ``sampling`` is one of :data:`SAMPLING`."""
    if sampling not in SAMPLING:
        raise ValueError(f"--sampling must be one of {', '.join(SAMPLING)}; got {sampling!r}")


@dataclass
class BayesLoraConfig:
    """Shape of the Gaussian LoRA adapter.

    Attributes:
        rank: LoRA rank r of both the mean and the scale pair.
        alpha: LoRA alpha; the mean update is scaled by alpha / r.
        target_modules: module-name suffixes to adapt (peft ``target_modules`` semantics).
        init_std_factor: c in rho0 = softplus^-1(c * std(W0)): the initial prior std of each
            weight entry, relative to the spread of the pretrained weights of its layer.
        kl_chunk_elements: the KL and hyperprior are computed over row blocks of at most this
            many weight entries (each block recomputed in backward), so a 4096 x 4096 layer
            never holds more than a fraction of one extra full matrix.
        init_seed: seeds the Kaiming-uniform draws of the mean and scale pairs' A matrices
            (drawn on the CPU, then moved), so a model built from one config starts from
            one prior whatever torch's global RNG state is (peft's own draws are replaced).
        sampling: how ``forward(sample=True)`` draws dW ~ N(M, S^2):
            "flipout" (docs/method.md; Wen et al. 2018): one sample per sequence (or per
            ``groups`` id), decorrelated by random signs; costs three extra full-rank matmuls
            per adapted layer in forward + backward.
            "per_batch": one sample per forward pass, shared by every sequence of the batch
            and added to W0 before the layer's own matmul (Bayes by Backprop, Blundell et al.
            2015); one extra full-rank matmul (the weight gradient), so cheaper, but every
            sequence sees the same dW, so a loss gradient has more variance
            (``benchmarks/results/sampling.md``), and the forward holds a sampled copy of
            every adapted W0 at once. With bf16 base weights the noise is rounded onto
            W0's bf16 grid (about 2% relative error at init_std_factor 0.1, more for smaller
            S). Not with FSDP, which shards W0.
        top_layers: adapt only the top L decoder layers (peft ``layers_to_transform``); 0
            adapts ``target_modules`` in every layer. The KL, hyperprior and exported adapter
            then cover those layers only.
        frozen_cache_mb: with ``top_layers`` > 0, keep the hidden states entering the lowest
            adapted layer per tokenised batch, up to this many MiB (least recently used
            evicted), so repeated forwards of a batch (inner steps, meta-steps re-using an
            episode, weight samples) run only the top layers (:mod:`abmll.layer_cache`).
            0: no cache. A runtime setting: it does not change any result beyond
            floating-point summation order.
    """

    rank: int = 4
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    init_std_factor: float = 0.1
    kl_chunk_elements: int = 1 << 20
    init_seed: int = 0
    sampling: Literal["flipout", "per_batch"] = "flipout"
    top_layers: int = 0
    frozen_cache_mb: int = setting(2048, role=MACHINE)

    def __post_init__(self) -> None:
        check_sampling(self.sampling)
        at_least(self, ("rank", "kl_chunk_elements"), 1)
        above(self, ("alpha", "init_std_factor"), 0)
        at_least(self, ("top_layers", "frozen_cache_mb"), 0)
        seeds(self, ("init_seed",))
        if not self.target_modules:
            raise ValueError("--target_modules needs at least one module name (or 'auto')")


@dataclass(frozen=True)
class AdaptedLayer:
    """Bookkeeping for one adapted layer: flat-dict keys of its four matrices, sizes, constants."""

    name: str
    mean_A: str
    mean_B: str
    scale_A: str
    scale_B: str
    base_weight: str
    fan_in_fan_out: bool
    d_in: int
    d_out: int
    scaling: float
    rho0: float


_CACHEABLE_KWARGS = {"position_ids", "logits_to_keep", "use_cache"}
"""Forward keywords the frozen-layer cache's key accounts for (any other one bypasses it)."""


def _fp32(params: Params) -> Params:
    """``params`` with half-precision tensors upcast to float32 (others as they are), so sums
    over millions of weight entries are accumulated in float32 at least."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in params.items()}


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the LM head: its input is the strided slice of the last
    ``logits_to_keep`` positions, and a strided 3D input makes ``F.linear`` run a batched matmul
    against the (vocab x d_model) weight expanded per sequence, several times slower on CPU than
    one matmul over the copied rows. Same result, one copy of (batch, keep, d_model)."""
    return (args[0].contiguous(), *args[1:])


class _NoiseState:
    """Shared switch read by every layer's flipout hook during one forward pass."""

    def __init__(self) -> None:
        self.sample = False
        self.groups: Tensor | None = None


def _rademacher(n: int, d: int, like: Tensor) -> Tensor:
    return torch.randint(0, 2, (n, d), device=like.device).to(like.dtype).mul_(2).sub_(1)


def _flipout_hook(state: _NoiseState, layer: AdaptedLayer, module: nn.Module, args, output: Tensor):
    """Add flipout noise ((x * s_in) (S * E)^T) * s_out to the layer's output.

    One E ~ N(0, 1)^(d_out x d_in) per forward; random signs s_in (d_in), s_out (d_out) per
    weight-sample group (default: per sequence, i.e. per row of the batch), shared along the
    sequence. x: (batch, ..., d_in); output: (batch, ..., d_out). Wen et al. 2018.
    """
    if not state.sample:
        return output
    x = args[0]
    S = std_matrix(module.bayes_scale_B, module.bayes_scale_A, layer.rho0)
    x = x.to(S.dtype)
    noise_w = S * torch.randn_like(S)
    groups = state.groups if state.groups is not None else torch.arange(x.shape[0], device=x.device)
    n_groups = int(groups.max()) + 1
    shape = (x.shape[0],) + (1,) * (x.dim() - 2)
    s_in = _rademacher(n_groups, layer.d_in, x)[groups].view(*shape, layer.d_in)
    s_out = _rademacher(n_groups, layer.d_out, x)[groups].view(*shape, layer.d_out)
    noise = ((x * s_in) @ noise_w.T) * s_out
    return output + noise.to(output.dtype)


class BayesLoraModel(nn.Module):
    """A frozen causal LM with Gaussian LoRA adapters on ``config.target_modules``.

    The module's own adapter parameters are only slots: callers pass the adapter tensors
    (a prior theta or a posterior lambda) as a flat dict to :meth:`forward`, which runs the
    model through ``functional_call``. Keys are parameter names inside ``self.peft_model``.

    ``config.target_modules`` = ``["auto"]`` (or ``[]``) picks the architecture's preset
    (:func:`preset_target_modules`); ``self.config`` then holds the resolved list.

    Raises:
        ValueError: if no module matches ``target_modules``, or a matched module is a layer
            type without a dense weight (only Linear and GPT-2 style Conv1D are supported);
            the message names the module.
    """

    def __init__(self, base_model: nn.Module, config: BayesLoraConfig) -> None:
        super().__init__()
        targets = resolve_target_modules(base_model, config.target_modules)
        if targets != list(config.target_modules):
            config = replace(config, target_modules=targets)
        self.config = config
        for p in base_model.parameters():
            p.requires_grad_(False)
        lora_config = peft_lora_config(
            config.rank, config.alpha, config.target_modules, top_layer_indices(base_model, config.top_layers)
        )
        kinds = {kind for _, kind in check_target_layers(base_model, lora_config)}
        if kinds == {"conv1d"}:  # Conv1D stores W0 as (d_in, d_out)
            lora_config = replace(lora_config, fan_in_fan_out=True)
        try:
            self.peft_model = get_peft_model(base_model, lora_config)
        except ValueError as err:
            raise ValueError(f"cannot adapt target_modules={config.target_modules}: {err}") from err
        self._noise = _NoiseState()
        self.layers: list[AdaptedLayer] = []
        generator = torch.Generator().manual_seed(config.init_seed)
        for name, module in self.peft_model.named_modules():
            if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
                self.layers.append(self._add_scale_pair(name, module, generator))
        self.frozen_cache = self._make_cache()
        get_head = getattr(base_model, "get_output_embeddings", None)  # a plain nn.Module has none
        head = get_head() if get_head is not None else None
        if head is not None:
            head.register_forward_pre_hook(_contiguous_input)

    def _make_cache(self) -> FrozenLayerCache | None:
        """The frozen-layer cache when the adapters leave decoder layers below them (else None)."""
        if not self.config.top_layers or not self.config.frozen_cache_mb:
            return None
        positions = [decoder_position(L.name) for L in self.layers]
        stack_name = positions[0][0]
        if any(name != stack_name for name, _ in positions):
            raise ValueError(f"adapted layers outside one decoder stack: {sorted({n for n, _ in positions})}")
        boundary = min(i for _, i in positions)
        if boundary == 0:
            return None
        stack = self.peft_model.get_submodule(stack_name)
        return FrozenLayerCache(stack, boundary, self.peft_model, self.config.frozen_cache_mb << 20)

    def drop_frozen_cache(self) -> None:
        """Stop caching the frozen layers' hidden states: every forward computes every layer
        (e.g. when the base model is sharded, where processes that hit and processes that miss
        would run different numbers of all-gathers)."""
        self.frozen_cache = None

    def _add_scale_pair(self, name: str, module: nn.Module, generator: torch.Generator) -> AdaptedLayer:
        lora_A = module.lora_A["default"]
        if not isinstance(lora_A, nn.Linear):
            raise ValueError(f"{name}: layer type {type(module.get_base_layer()).__name__} is not supported")
        d_in, d_out = module.in_features, module.out_features
        w0 = module.get_base_layer().weight
        rho0 = inverse_softplus(self.config.init_std_factor * w0.float().std().item())
        A_mu, A_s = (
            nn.init.kaiming_uniform_(torch.empty(self.config.rank, d_in), a=math.sqrt(5), generator=generator) for _ in range(2)
        )  # peft's init of lora_A, from our generator
        with torch.no_grad():
            lora_A.weight.copy_(A_mu)
        module.bayes_scale_A = nn.Parameter(A_s.to(lora_A.weight), requires_grad=False)
        module.bayes_scale_B = nn.Parameter(torch.zeros_like(module.lora_B["default"].weight), requires_grad=False)
        for p in (lora_A.weight, module.lora_B["default"].weight):
            p.requires_grad_(False)
        layer = AdaptedLayer(
            name=name,
            mean_A=f"{name}.{LORA_A}",
            mean_B=f"{name}.{LORA_B}",
            scale_A=f"{name}.{SCALE_A}",
            scale_B=f"{name}.{SCALE_B}",
            base_weight=f"{name}.base_layer.weight",
            fan_in_fan_out=bool(module.fan_in_fan_out),
            d_in=d_in,
            d_out=d_out,
            scaling=float(module.scaling["default"]),
            rho0=rho0,
        )
        module.register_forward_hook(partial(_flipout_hook, self._noise, layer))
        return layer

    # -- parameters -------------------------------------------------------------------------
    def init_params(self) -> Params:
        """The adapter tensors at initialisation (peft's LoRA init for the mean pair: A
        Kaiming-uniform, B zero, so M = 0; scale pair A Kaiming-uniform, B zero, so
        S = c * std(W0); the A draws seeded by ``config.init_seed``). Returns fresh detached
        copies, one entry per matrix."""
        named = dict(self.peft_model.named_parameters())
        return {
            k: named[k].detach().clone()
            for layer in self.layers
            for k in (layer.mean_A, layer.mean_B, layer.scale_A, layer.scale_B)
        }

    def mean_keys(self) -> list[str]:
        """Flat-dict keys of the mean pairs only (what a plain LoRA adapter holds)."""
        return [k for layer in self.layers for k in (layer.mean_A, layer.mean_B)]

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        params: Params,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        sample: bool = False,
        groups: Tensor | None = None,
        **kwargs,
    ):
        """Run the LM with adapter tensors ``params``.

        Args:
            params: flat dict of adapter tensors (a subset is allowed: missing ones keep the
                module's own values).
            input_ids, attention_mask: (batch, seq).
            sample: draw weight samples dW ~ N(M, S^2) (``config.sampling``: flipout, one per
                group; per_batch, one for the whole batch); False runs the posterior mean
                W0 + M (the method's n_samples = 0).
            groups: (batch,) long; under flipout, rows with the same id share one weight
                sample (used so all options of an example are scored under the same dW).
                Default: one per row. Ignored by per_batch sampling (all rows share one).
            kwargs: passed to the model (position_ids, logits_to_keep, ...).
        Returns: the model's output (``.logits``: (batch, seq or logits_to_keep, vocab)).
        """
        if sample and self.config.sampling != "flipout":
            check_sampling(self.config.sampling)  # the config may have been changed after construction
            params = {**params, **self._sampled_base_weights(params)}
            sample = False
        self._noise.sample, self._noise.groups = sample, groups
        if attention_mask is not None and attention_mask.is_floating_point():  # additive 4D mask
            attention_mask = attention_mask.to(self.peft_model.get_input_embeddings().weight.dtype)
        run = partial(  # tie_weights=False: a sampled W0 must not reach a weight tied to it
            functional_call,
            self.peft_model,
            params,
            args=(),
            strict=False,
            tie_weights=False,
            kwargs=dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs),
        )
        try:
            if self.frozen_cache is None or input_ids is None or set(kwargs) - _CACHEABLE_KWARGS:
                return run()  # inputs the cache key does not cover: compute every layer
            return self.frozen_cache.run(run, input_ids, attention_mask, kwargs.get("position_ids"))
        finally:
            self._noise.sample, self._noise.groups = False, None

    def _sampled_base_weights(self, params: Params) -> Params:
        """One weight sample per adapted layer, W0 + S * E with E ~ N(0, 1)^(d_out x d_in),
        keyed by the base layer's weight name (stored transposed for Conv1D), in W0's dtype.
        Differentiable in the scale pair; the mean path M stays peft's low-rank LoRA."""
        own = dict(self.peft_model.named_parameters(remove_duplicate=False))  # a tied W0 has two names
        out = {}
        for L in self.layers:
            S = std_matrix(params.get(L.scale_B, own[L.scale_B]), params.get(L.scale_A, own[L.scale_A]), L.rho0)
            noise = S * torch.randn_like(S)
            w0 = own[L.base_weight]
            out[L.base_weight] = w0 + (noise.T if L.fan_in_fan_out else noise).to(w0.dtype)
        return out

    # -- KL and hyperprior ---------------------------------------------------------------------
    def kl(self, q: Params, p: Params, twice_differentiable: bool = False) -> Tensor:
        """KL(q || p) between two Gaussian-LoRA distributions, summed over every weight entry
        of every adapted layer (docs/method.md, "Meta-objective"). Differentiable in both q and p,
        once, with the gradient in closed form (:func:`abmll.gaussian_lora.layer_kl`);
        ``twice_differentiable=True`` builds it from plain autograd ops instead, for
        ``create_graph`` (the second-order reference). A layer larger than
        ``kl_chunk_elements`` entries is computed in row blocks, each recomputed during
        backward (activation checkpointing). Computed in float32 (at least) whatever the
        dtype of the tensors or of the base model. Returns a scalar (nats)."""
        q, p = _fp32(q), _fp32(p)
        total = 0.0
        for L in self.layers:
            pair_q = (q[L.mean_B], q[L.mean_A], q[L.scale_B], q[L.scale_A])
            pair_p = (p[L.mean_B], p[L.mean_A], p[L.scale_B], p[L.scale_A])
            total = total + layer_kl(pair_q, pair_p, L.scaling, L.rho0, self.config.kl_chunk_elements, twice_differentiable)
        return total

    def neg_log_hyperprior(self, theta: Params, hyper: HyperpriorConfig) -> Tensor:
        """-log p(theta): N(0, mean_std^2) on each entry of M_theta and Gamma(a0, b0) on each
        precision 1 / S_theta^2, summed over all entries (ABML, Ravi & Beatson 2019).
        Returns a float32 scalar (nats)."""
        theta = _fp32(theta)
        total = 0.0
        for L in self.layers:
            four = (theta[L.mean_B], theta[L.mean_A], theta[L.scale_B], theta[L.scale_A])
            total = total + layer_neg_log_hyperprior(four, L.scaling, L.rho0, hyper, self.config.kl_chunk_elements)
        return total

    def num_weight_entries(self) -> int:
        """Number of weight entries the KL and hyperprior sum over (sum of d_out * d_in)."""
        return sum(L.d_out * L.d_in for L in self.layers)
