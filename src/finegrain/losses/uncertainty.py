"""Homoscedastic-uncertainty loss weighting (Kendall, Gal and Cipolla, CVPR 2018, arXiv 1705.07115).

DCAL (arXiv 2205.02151, Eq. 6) balances its SA, GLCA and PWCA branches with one learnable
scalar ``w_b`` per branch instead of hand-tuned coefficients:

    L = 0.5 * sum_b (exp(-w_b) * L_b + w_b)

``w_b`` plays the role of ``log sigma_b^2``: a branch with a large loss can raise its ``w_b``
to lower its weight ``exp(-w_b)``, and the ``+ w_b`` term keeps it from raising it forever
(at the optimum ``exp(-w_b) = 1 / L_b``). The module returns each branch's weighted term
separately (the training engine sums them) so that every term can be logged by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(nn.Module):
    """Learnable uncertainty weights ``w_b`` over named loss terms.

    Args:
        names: one name per loss term (``("sa", "glca", "pwca")``); fixes the order of
            ``self.w``.
        init: initial ``w_b``: one value for every term, or ``{name: value}`` (missing
            names start at 0). 0 gives every term weight ``exp(0) = 1`` and the total
            ``0.5 * sum_b L_b``; FairMOT, which DCAL says it follows, starts its two terms at
            -1.85 and -1.05.
    """

    def __init__(self, names: Sequence[str], init: float | Mapping[str, float] = 0.0):
        super().__init__()
        if len(names) == 0 or len(set(names)) != len(names):
            raise ValueError(f"UncertaintyWeighting needs distinct, non-empty names, got "
                             f"{list(names)}")
        self.names = tuple(names)
        if isinstance(init, Mapping):
            unknown = set(init) - set(self.names)
            if unknown:
                raise KeyError(f"w_init names {sorted(unknown)} are not loss terms; known "
                               f"terms: {list(self.names)}")
            values = [float(init.get(n, 0.0)) for n in self.names]
        else:
            values = [float(init)] * len(self.names)
        # One scalar per term, log-variance parametrisation; 1-d, so the engine exempts it
        # from weight decay (decay would pull every weight towards exp(0) = 1).
        self.w = nn.Parameter(torch.tensor(values))

    def weights(self) -> dict[str, torch.Tensor]:
        """The current ``w_b`` by name (detached, for logging)."""
        return {n: self.w[i].detach() for i, n in enumerate(self.names)}

    def forward(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weight each term: ``{b: 0.5 * (exp(-w_b) * L_b + w_b)}`` (fp32 scalars).

        Args:
            losses: ``{name: scalar loss}``; any subset of ``names`` (a term absent from a step
                contributes nothing, its ``w_b`` gets no gradient that step).

        Returns:
            The weighted terms under the same names; their sum is ``L`` above.
        """
        unknown = set(losses) - set(self.names)
        if unknown:
            raise KeyError(f"no uncertainty weight for loss terms {sorted(unknown)}; "
                           f"known terms: {list(self.names)}")
        out = {}
        for i, name in enumerate(self.names):
            if name not in losses:
                continue
            loss = losses[name].float()
            if loss.dim() != 0:
                raise ValueError(f"loss {name!r} must be a scalar, got shape "
                                 f"{tuple(loss.shape)}")
            w = self.w[i].float()
            out[name] = 0.5 * (torch.exp(-w) * loss + w)
        return out

    def extra_repr(self) -> str:
        return f"names={self.names}"
