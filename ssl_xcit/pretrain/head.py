"""DINO projection head (arXiv 2104.14294, Sec. 3.1 and App. C)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP → L2-normalise → weight-normalised linear layer without bias.

    Args:
        in_dim: backbone embedding size.
        out_dim: K, the number of prototypes (65536 in DINO).
        nlayers: linear layers in the MLP (3 in DINO; 1 means a single in→bottleneck layer).
        hidden_dim: MLP width (2048).
        bottleneck_dim: MLP output size before the prototypes (256).
        use_bn: BatchNorm after each hidden linear layer.
        norm_last_layer: freeze the weight-norm magnitude ``g`` at 1, so every prototype
            stays unit-norm; DINO reports it stabilises training of small models.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"model.head_nlayers must be >= 1, got {nlayers}")
        self.mlp = self._build_mlp(in_dim, nlayers, hidden_dim, bottleneck_dim, use_bn)
        self.apply(self._init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    @staticmethod
    def _build_mlp(in_dim: int, nlayers: int, hidden_dim: int, bottleneck_dim: int, use_bn: bool) -> nn.Sequential:
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        return nn.Sequential(*layers)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) → (N, out_dim) logits, in the last layer's dtype (float32 under any mixed
        precision): the logits are divided by a teacher temperature of 0.04, so a bf16 rounding
        of them (8 bits of mantissa) would become ~0.05 nats of error per logit."""
        x = self.mlp(x)
        weight = self.last_layer.parametrizations.weight.original1
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(F.normalize(x.to(weight.dtype), dim=-1, p=2))
