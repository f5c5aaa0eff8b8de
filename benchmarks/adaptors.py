"""Mixture-of-experts adaptors with a *learned softmax router* (no anchors, no fall-through to the base FFN), the
designs LEMoE is compared with: the conventional MoE adaptor (fixed experts, all trainable, token router) and the
LEMoE ablation "without KV anchor routing" (experts inserted and frozen per batch, a learned key per expert)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lemoe_peft.routing import causal_mean


class RoutedAdaptor(nn.Module):
    """``base(x) + w * expert(x)``: each token goes to its top-1 expert by ``softmax(keys . query)``, weighted by
    that probability (Switch-style), so the router learns through the weight."""

    def __init__(self, base: nn.Linear, rank: int, pooling: str = "token") -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.pooling = pooling
        self.experts_in = nn.ParameterList()
        self.experts_out = nn.ParameterList()
        self.keys = nn.ParameterList()

    def add_expert(self) -> list[nn.Parameter]:
        """A new expert (zero output) and its router key; returns their parameters."""
        d_in, d_out = self.base.in_features, self.base.out_features
        weight_in = torch.empty(self.rank, d_in)
        nn.init.kaiming_uniform_(weight_in, a=math.sqrt(5))
        like = self.base.weight
        self.experts_in.append(nn.Parameter(weight_in.T.contiguous().to(like)))
        self.experts_out.append(nn.Parameter(torch.zeros(self.rank, d_out).to(like)))
        self.keys.append(nn.Parameter((torch.randn(d_in) / math.sqrt(d_in)).to(like)))
        return [self.experts_in[-1], self.experts_out[-1], self.keys[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not len(self.keys):
            return out
        query = x if self.pooling == "token" else causal_mean(x)[0].to(x.dtype)
        probabilities = torch.softmax(F.normalize(query, dim=-1) @ torch.stack(list(self.keys)).T * 10.0, dim=-1)
        weight, chosen = probabilities.max(dim=-1)
        for expert in torch.unique(chosen).tolist():
            mask = chosen == expert
            hidden = F.silu(x[mask] @ self.experts_in[expert]) @ self.experts_out[expert]
            out = out.index_put((mask,), out[mask] + weight[mask, None] * hidden)
        return out
