"""Trainable descriptor heads: GeM with a learned, bounded ``p`` and end-to-end whitening as a linear layer.

Both keep the state-dict keys of what inference builds (``pool.p`` of :class:`lookalike.pooling.GeM`,
``whiten.weight`` / ``whiten.bias`` of the ``nn.Linear`` in :class:`lookalike.network.DescriptorNet`), so a
fine-tuned head loads into the ordinary descriptor network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lookalike.errors import ConfigError
from lookalike.pooling import GeM, gem
from lookalike.whitening import Whitening


class LearnableGeM(GeM):
    """:class:`~lookalike.pooling.GeM` whose ``p`` is a parameter, used as ``max(p, p_min)``.

    Below 1 GeM is no longer between average and max pooling, and as ``p → 0`` the ``1 / p`` power
    overflows; the floor keeps an aggressive learning rate from getting there. At or above ``p_min`` it is
    :func:`lookalike.pooling.gem` with the current ``p``; below, ``p`` gets no gradient and stays until the
    optimiser's other terms move it. cirtorch trains ``p`` without weight decay, which the optimiser's
    parameter groups decide.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, p_min: float = 1.0) -> None:
        if not p_min > 0:
            raise ConfigError(f"the floor of GeM's p must be positive, got {p_min}")
        if p < p_min:
            raise ConfigError(f"GeM's initial p = {p} is below its floor {p_min}")
        super().__init__(p=p, eps=eps, learnable=True)
        self.p_min = p_min

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, p=self.p.clamp(min=self.p_min), eps=self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p_min={self.p_min}"


class WhiteningLayer(nn.Linear):
    """A learned (or PCA) :class:`~lookalike.whitening.Whitening` as a trainable ``nn.Linear``.

    ``Whitening.apply(x) = L2((x − mean) Pᵀ)``; the layer holds ``weight = P`` and ``bias = −P·mean``
    (computed in float64), so at initialisation ``L2(layer(x))`` — what
    :func:`lookalike.network.descriptor_head` computes after pooling — equals ``whitening.apply(x)``.
    The L2 normalisation stays in the head, not in the layer.
    """

    def __init__(self, whitening: Whitening) -> None:
        super().__init__(whitening.input_dim, whitening.dim)
        projection = whitening.projection.astype(np.float64)
        bias = -(projection @ whitening.mean.astype(np.float64))
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(projection))
            self.bias.copy_(torch.from_numpy(bias))


__all__ = ["LearnableGeM", "WhiteningLayer"]
