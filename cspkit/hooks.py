"""Recording and editing activations by node-location name.

A hook function takes ``(activation, name)`` and returns a replacement tensor or None
(keep the activation). Hooks live only for one call of run_with_cache / run_with_hooks,
or inside the ``hooks`` context manager, and only in the thread that attached them: the
explorer computes in a background thread while the notebook runs forwards of its own on the
same model, and neither may see the other's hooks.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]
_THREAD = threading.local()


class _Recorded(Exception):
    """Raised by run_with_cache(stop=True) once it holds every activation it was asked for."""


class HookPoint(nn.Module):
    """Identity, unless hook functions are attached."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    @property
    def fns(self) -> list[HookFn]:
        """The hook functions this thread attached."""
        table = _THREAD.__dict__.setdefault("fns", weakref.WeakKeyDictionary())
        return table.setdefault(self, [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self.name)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(f"hook on {self.name} returned shape {tuple(out.shape)}, "
                                     f"expected {tuple(x.shape)}")
                x = out
        return x

    def extra_repr(self) -> str:
        return repr(self.name)


class HookedMixin:
    """run_with_cache / run_with_hooks for a module tree that contains HookPoints."""

    @property
    def hook_points(self) -> dict[str, HookPoint]:
        if not hasattr(self, "_hook_points"):
            self._hook_points = {m.name: m for m in self.modules() if isinstance(m, HookPoint)}
        return self._hook_points

    def _resolve(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        unknown = [n for n in names if n not in self.hook_points]
        if unknown:
            raise KeyError(f"unknown node location(s) {unknown}; known: {', '.join(self.hook_points)}")
        return names

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: dict[str, HookFn | list[HookFn]]):
        added = []
        try:
            for name in self._resolve(fwd_hooks):
                fns = fwd_hooks[name]
                for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
                    self.hook_points[name].fns.append(fn)
                    added.append((name, fn))
            yield self
        finally:
            for name, fn in added:
                self.hook_points[name].fns.remove(fn)

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: dict[str, HookFn | list[HookFn]], **kw):
        with self.hooks(fwd_hooks):
            return self(tokens, **kw)

    def run_with_cache(self, tokens: torch.Tensor, names: Iterable[str] | None = None,
                       detach: bool = True, stop: bool = False, **kw):
        """Forward once; return (output, {name: activation}) for the named locations (default all).
        ``stop``: end the forward as soon as every named location is recorded, and return None for
        the output (a layer-0 node's activations then cost a quarter of a 4-layer forward)."""
        names = self._resolve(self.hook_points if names is None else names)
        cache: dict[str, torch.Tensor] = {}

        def record(x, name):
            cache[name] = x.detach() if detach else x
            if stop and len(cache) == len(names):
                raise _Recorded

        with self.hooks({n: record for n in names}):
            try:
                out = self(tokens, **kw)
            except _Recorded:
                out = None
        return out, cache

