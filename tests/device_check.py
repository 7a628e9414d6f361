"""A CPU stand-in for a GPU run's device errors: tensors the package creates on the host meet module tensors.

On a GPU, a tensor made with ``torch.tensor(...)``, ``torch.zeros(...)``, ``torch.from_numpy(...)`` or
``.cpu()`` without naming a device lives on the CPU, and the first op that mixes it with the module's CUDA
tensors fails. On a CPU run both are CPU tensors, so nothing fails. :class:`HostTensorCheck` restores the
failure: while it is active, every tensor that code of the package creates on the default device (no
``device=`` given) is tagged *host*, ops on host tensors alone stay host, ``.to(device)`` makes a tensor
the module's again, and an op that mixes a host tensor of one or more dimensions with any other tensor
raises :class:`HostTensorError` naming the op and where the host tensor was made. Zero-dimensional tensors
mix freely (CUDA accepts CPU scalars), as does indexing with a host index (CUDA accepts it too).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import lightning_desa2va

PACKAGE_DIR = str(Path(lightning_desa2va.__file__).resolve().parent)
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.scalar_tensor,
}
"""Functions that create a tensor on the default device unless given ``device=``."""
ALWAYS_HOST = {torch.from_numpy, torch.Tensor.cpu, torch.Tensor.numpy}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
INDEXING = {torch.Tensor.__getitem__}


class HostTensorError(RuntimeError):
    """A tensor the package made on the host met a module tensor (on a GPU: a device mismatch)."""


def _package_caller() -> str | None:
    """``file:line`` of the package code that called the torch function now running, if any did."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(PACKAGE_DIR):
            return f"{Path(filename).relative_to(PACKAGE_DIR)}:{frame.f_lineno}"
        if not (filename.startswith(torch.__path__[0]) or filename == __file__):
            return None  # library code made it: its device handling is the library's business
        frame = frame.f_back
    return None


class HostTensorCheck(TorchFunctionMode):
    """The tagging mode described in the module docstring; ``violations`` lists what it raised."""

    def __init__(self) -> None:
        super().__init__()
        self.host: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.violations: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.host and func not in FACTORIES and func not in ALWAYS_HOST:
            return func(*args, **kwargs)  # no host tensor alive: nothing to check, nothing to tag
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        if func not in MOVES and func not in ALWAYS_HOST:
            self._check(func, tensors)
        result = func(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            return result
        origin = self._origin(func, args, kwargs, tensors)
        if origin is None:
            self.host.pop(result, None)
        else:
            self.host[result] = origin
        return result

    def _check(self, func: Any, tensors: list[torch.Tensor]) -> None:
        hosts = [t for t in tensors if t in self.host and t.ndim > 0]
        if func in INDEXING:
            hosts = hosts[:1] if tensors and tensors[0] in self.host else []
        others = [t for t in tensors if t not in self.host]
        if hosts and others:
            name = getattr(func, "__qualname__", repr(func))
            message = f"{name} mixes a host tensor made at {self.host[hosts[0]]} with the module's tensors"
            self.violations.append(message)
            raise HostTensorError(message)

    def _origin(self, func: Any, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> str | None:
        """Where the result was made on the host, or ``None`` when it is the module's."""
        if func in FACTORIES:
            return _package_caller() if kwargs.get("device") is None else None
        if func in ALWAYS_HOST:
            return _package_caller() or (self.host.get(tensors[0]) if tensors else None)
        if func is torch.Tensor.cuda:
            return None
        if func is torch.Tensor.to:
            return self._moved(args, kwargs)
        if tensors and all(t in self.host for t in tensors):
            return self.host[tensors[0]]
        return None

    def _moved(self, args: tuple, kwargs: dict) -> str | None:
        """``.to(...)``: a device or a tensor gives the target's side; a dtype alone keeps the source's."""
        source, targets = args[0], [*args[1:], kwargs.get("device"), kwargs.get("other")]
        for target in targets:
            if isinstance(target, torch.Tensor):
                return self.host.get(target)
            if isinstance(target, str | torch.device):
                return None
        return self.host.get(source)
