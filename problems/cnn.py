"""The residual convolutional network of the paper's MNIST experiments (Sec. 5, Figs. 2-4).

The paper's text: two projection layers (3 x 3 convolution, tanh, 2 x 2 max pooling),
then residual layers x + delta tanh(W * x + b) with 3 x 3 convolutions of 32 channels
and delta = 0.5 (7 of them, T = 3.5), then a fully connected classifier with softmax
cross-entropy; mini-batches of 100.

The paper's reference code (LiQianxiao/MaxPrinciple-DeepLearning, main_mnist.py,
config.yml, msalib/layers.py) runs a smaller configuration: 5 channels, *average*
pooling ('same' padding: 28 -> 14 -> 7), 2 residual layers (delta 0.5), then the
mean over the channels (its layer ``Lower``: [N, 7, 7, 5] -> [N, 7, 7, 1]) before
flatten and the dense layer; rho = 0.03, an L2 regulariser reg |theta_n|^2 / 2 per
layer with reg = 0.001, batch 128, 1 epoch of the 60,000 MNIST images, learning
rates SGD 0.01, Adagrad 0.01, Adam 0.001, 10 L-BFGS iterations per Hamiltonian
maximisation with no start perturbation.

``residual_cnn`` builds either (and sizes between) as one flat ``torch.nn.Sequential``
whose entries are the layers x_{n+1} = g_n(x_n, theta_n) that ``pmp.nn.EMSA`` works on:
parameterless entries (Tanh, pooling, the channel mean, Flatten) are layers with nothing
to maximise. Its default (8 channels, 2 residual layers, average pooling) trains on
2 CPU cores in minutes. The loss is ``cross_entropy`` (softmax cross-entropy, mean over
the batch). The reference code's regulariser is not part of the model: the study gives
it to every optimizer as its weight decay (``--reg``, ``pmp.nn.EMSA(weight_decay=...)``).

    >>> net = residual_cnn(channels=5, residual_layers=2, channel_mean=True)   # the reference code's
    >>> net(torch.zeros(3, 1, 28, 28)).shape
    torch.Size([3, 10])
"""
from __future__ import annotations

from typing import Optional

import torch

import pmpsolve as pmp

__all__ = ["residual_cnn", "ChannelMean", "cross_entropy", "REFERENCE_CONFIG"]

#: The reference code's MNIST configuration (config.yml), for the record.
REFERENCE_CONFIG = dict(channels=5, residual_layers=2, pooling="avg", channel_mean=True, delta=0.5, rho=0.03,
                        reg=0.001, batch_size=128, epochs=1, maximiser_iter=10, perturb=0.0,
                        learning_rates={"sgd": 0.01, "adagrad": 0.01, "adam": 0.001})


class ChannelMean(torch.nn.Module):
    """[N, C, H, W] -> [N, 1, H, W], the mean over the channels (the reference code's ``Lower`` layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, the mean over the batch: logits [B, classes], labels [B] int64 -> []."""
    return torch.nn.functional.cross_entropy(logits, labels)


def residual_cnn(*, channels: int = 8, residual_layers: int = 2, in_channels: int = 1, image_size: int = 28,
                 classes: int = 10, delta: float = 0.5, pooling: str = "avg", channel_mean: bool = False,
                 seed: Optional[int] = None) -> torch.nn.Sequential:
    """The residual CNN as one flat Sequential mapping images [B, in_channels, S, S] to logits [B, classes].

    Entries: Conv2d(in_channels, c, 3) Tanh Pool  Conv2d(c, c, 3) Tanh Pool
    (the two projection layers; pooling 2 x 2, stride 2, S -> ceil(S/2) -> ceil(S/4)),
    ``residual_layers`` x Residual(Sequential(Conv2d(c, c, 3, padding=1), Tanh()), delta),
    [ChannelMean] Flatten Linear(features, classes).

    Args:
        channels: c, the channels of every convolution (paper 32, reference code 5).
        residual_layers: how many residual layers (paper 7, reference code 2); 0 is allowed.
        in_channels, image_size: the input images' channels and side (28 for MNIST, 8 for the 8x8 digits).
        classes: outputs of the classifier.
        delta: the residual step (the paper's 0.5).
        pooling: "avg" (the reference code's) or "max" (the paper's text).
        channel_mean: average the channels before the classifier (the reference code does).
        seed: when given, the initial weights are drawn from this seed without touching the
            global random state (the same seed gives the same network).
    """
    for name, value, low in (("channels", channels, 1), ("residual_layers", residual_layers, 0),
                             ("in_channels", in_channels, 1), ("image_size", image_size, 1), ("classes", classes, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"residual_cnn: `{name}` must be a whole number >= {low}, got {value!r}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"residual_cnn: `pooling` must be 'avg' or 'max', got {pooling!r}")
    if seed is None:
        return _build(channels, residual_layers, in_channels, image_size, classes, delta, pooling, channel_mean)
    with torch.random.fork_rng(devices=[]):  # the global CPU random state is restored afterwards
        torch.manual_seed(seed)
        return _build(channels, residual_layers, in_channels, image_size, classes, delta, pooling, channel_mean)


def _build(c, depth, in_channels, size, classes, delta, pooling, channel_mean) -> torch.nn.Sequential:
    # ceil_mode: the reference code's 'same' pooling, so an odd side keeps its last row (7 -> 4, not 3).
    Pool = (lambda: torch.nn.AvgPool2d(2, ceil_mode=True)) if pooling == "avg" else (
        lambda: torch.nn.MaxPool2d(2, ceil_mode=True))
    layers = [torch.nn.Conv2d(in_channels, c, 3, padding=1), torch.nn.Tanh(), Pool(),
              torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Tanh(), Pool()]
    layers += [pmp.nn.Residual(torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Tanh()), delta)
               for _ in range(depth)]
    if channel_mean:
        layers.append(ChannelMean())
    layers.append(torch.nn.Flatten())
    side = -(-(-(-size // 2)) // 2)  # ceil(ceil(size / 2) / 2), the side after the two poolings
    features = (1 if channel_mean else c) * side * side
    layers.append(torch.nn.Linear(features, classes))
    return torch.nn.Sequential(*layers)
