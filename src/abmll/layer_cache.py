"""Frozen-layer cache: run the decoder layers below the adapted ones once per tokenised batch.

With adapters only in the top L decoder layers (``BayesLoraConfig.top_layers``), the layers
below the lowest adapted one never see an adapter tensor: the hidden states entering the
lowest adapted layer depend only on the batch's tokens, attention mask and positions. An
episode's support and query batches are scored many times (K inner steps per meta-step, every
meta-step that samples the episode again, n weight samples at prediction), so this cache keeps
those hidden states, (S, T, d_model) per batch in the model's dtype, and later forwards of the
same batch skip the frozen layers:

- first forward of a batch: the model runs (no gradients) until the lowest adapted layer, whose
  input is stored, then stops;
- every forward of a cached batch: the frozen layers are replaced by a pass-through, and the
  stored hidden states are put in place of the lowest adapted layer's input. Embedding, mask
  and rotary-position preparation still run (cheap); everything from the lowest adapted layer
  up (adapters, flipout noise, final norm, LM head) runs as in the uncached model, so loss and
  gradients are the same up to floating-point summation order.

The key is the batch's content (input_ids, attention_mask, position_ids) plus everything that
would change the stored states: the boundary layer index, the base model's dtype and device,
and the storage and version counter of every frozen parameter and buffer (an in-place change,
e.g. ``load_state_dict``, or a new tensor, gives new keys). A write through ``.data`` bypasses
version counters: call :meth:`FrozenLayerCache.clear` after one. Entries are evicted
least-recently-used once their total size passes ``max_bytes``. Works for decoder stacks whose
layers return the hidden-state tensor (transformers >= 5 for Llama, Mistral, Qwen2/3, Gemma,
GPT-2, OPT). Not under FSDP (:func:`abmll.distributed.shard_base_model` turns it off).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class _Captured(Exception):
    """Stops a forward pass once the input of the boundary layer has been stored."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _pass_through(*args, **kwargs) -> Tensor:
    return _hidden_arg(args, kwargs)


def _digest(t: Tensor | None) -> str:
    if t is None:
        return "-"
    t = t.detach().contiguous().cpu()
    return f"{tuple(t.shape)}{t.dtype}" + hashlib.blake2b(t.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


class FrozenLayerCache:
    """LRU cache of the hidden states entering decoder layer ``boundary`` of ``layers``.

    Args:
        layers: the model's stack of decoder layers (e.g. ``model.model.layers``).
        boundary: index of the lowest layer holding an adapter (> 0); layers ``[0, boundary)``
            must be frozen and adapter-free.
        frozen: a module holding everything that determines the cached states (e.g. the
            whole model); the storage and version of each of its parameters and buffers
            outside ``layers[boundary:]`` are part of every key.
        max_bytes: bound on the total size of the stored hidden states (bytes); an entry
            larger than the bound is used for its own forward and not stored.
    Attributes:
        hits, misses: forwards served from the cache / that had to run the frozen layers.
    Raises:
        ValueError: ``boundary`` outside ``[1, len(layers))``, or ``max_bytes`` < 1.
    """

    def __init__(self, layers: nn.ModuleList, boundary: int, frozen: nn.Module, max_bytes: int) -> None:
        if not 0 < boundary < len(layers):
            raise ValueError(f"cache boundary must be in [1, {len(layers)}), got {boundary}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.layers, self.boundary, self.max_bytes = layers, boundary, max_bytes
        self._root = frozen
        self._above = {id(t) for layer in layers[boundary:] for t in (*layer.parameters(), *layer.buffers())}
        self._store: OrderedDict[tuple, Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Drop every stored entry."""
        self._store.clear()
        self.nbytes = 0

    def key(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> tuple:
        """The cache key of one forward's inputs (see the module docstring)."""
        state = tuple(
            (t.data_ptr(), t._version, str(t.dtype), str(t.device))
            for t in (*self._root.parameters(), *self._root.buffers())
            if id(t) not in self._above
        )
        return (self.boundary, hash(state), _digest(input_ids), _digest(attention_mask), _digest(position_ids))

    def run(
        self, forward: Callable[[], Any], input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None
    ) -> Any:
        """``forward()`` (a full forward pass of the model on these inputs) with the frozen
        layers served from the cache; on a miss they run once first, without gradients."""
        key = self.key(input_ids, attention_mask, position_ids)
        hidden = self._store.get(key)
        if hidden is not None:
            self.hits += 1
            self._store.move_to_end(key)
        else:
            self.misses += 1
            hidden = self._capture(forward)
            self._put(key, hidden)
        return self._replay(forward, hidden)

    def _put(self, key: tuple, hidden: Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if size > self.max_bytes:
            return
        self._store[key] = hidden
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()

    def _capture(self, forward: Callable[[], Any]) -> Tensor:
        def stop(module, args, kwargs):
            raise _Captured(_hidden_arg(args, kwargs).detach())

        handle = self.layers[self.boundary].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with torch.no_grad():
                forward()
        except _Captured as done:
            return done.hidden
        finally:
            handle.remove()
        raise RuntimeError(f"decoder layer {self.boundary} was never called: cannot cache the frozen layers below it")

    def _replay(self, forward: Callable[[], Any], hidden: Tensor) -> Any:
        def inject(module, args, kwargs):
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = self.layers[self.boundary].register_forward_pre_hook(inject, with_kwargs=True)
        skipped = list(self.layers[: self.boundary])
        own = [vars(layer).get("forward") for layer in skipped]  # e.g. accelerate's wrapped forward
        for layer in skipped:
            layer.forward = _pass_through
        try:
            return forward()
        finally:
            handle.remove()
            for layer, saved in zip(skipped, own):
                if saved is None:
                    del layer.forward
                else:
                    layer.forward = saved
