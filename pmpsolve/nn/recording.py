"""States and co-states of a network from one forward and one backward pass (paper Alg. 3, steps 2-3).

For the layer x_{n+1} = g_n(x_n, theta_n) the maximum principle needs the layer's
input x_n, its output x_{n+1} and the co-state p_{n+1} = -d loss / d x_{n+1}. A
forward hook on each layer keeps its input and output; a tensor hook on the output
receives d loss / d x_{n+1} during the closure's own ``loss.backward()``: no
second autograd graph, no extra pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, NamedTuple

import torch

__all__ = ["LayerRecord", "CostateRecorder"]


class LayerRecord(NamedTuple):
    """One layer's frozen data: input x_n, output x_{n+1} and co-state p_{n+1}, each [B, ...] (detached)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    costates: torch.Tensor


class CostateRecorder:
    """Hooks on the layers ``layers`` (index -> module) that record while ``recording()`` is active.

    Outside ``recording()`` the hooks do nothing (evaluation passes, ``torch.no_grad``
    blocks and the optimizer's own trial evaluations leave no trace). When a layer runs
    several times in one recording, the last call counts.
    """

    def __init__(self, layers: Dict[int, torch.nn.Module]):
        self._active = False
        self._io: Dict[int, tuple] = {}
        self._grads: Dict[int, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(n)) for n, module in layers.items()]

    def _hook(self, n: int):
        def forward_hook(module, inputs, output):
            if not self._active:
                return
            if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise TypeError(f"pmp.nn: layer {n} ({type(module).__name__}) must map one tensor to one tensor")
            self._io[n] = (inputs[0].detach(), output.detach())
            self._grads.pop(n, None)
            if output.requires_grad:
                def grad_hook(grad, n=n):
                    self._grads[n] = grad.detach()
                output.register_hook(grad_hook)
        return forward_hook

    @contextmanager
    def recording(self):
        self._io, self._grads = {}, {}
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def records(self, layers: List[int]) -> Dict[int, LayerRecord]:
        """The records of ``layers``; a clear error when the closure did not run the forward and backward pass."""
        missing = [n for n in layers if n not in self._io]
        if missing:
            raise RuntimeError(
                f"pmp.nn: the closure did not run layer(s) {missing} of the model: the closure must compute the "
                "loss with model(x) (this model, every layer) and call loss.backward()")
        no_grad = [n for n in layers if n not in self._grads]
        if no_grad:
            raise RuntimeError(
                f"pmp.nn: no gradient reached the output of layer(s) {no_grad}: the closure must call "
                "loss.backward() on a loss that depends on the model's output (not under torch.no_grad)")
        out = {}
        for n in layers:
            x, y = self._io[n]
            # p_{n+1} = -d loss / d x_{n+1} (the co-state of the maximum principle)
            out[n] = LayerRecord(x, y, -self._grads[n])
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
