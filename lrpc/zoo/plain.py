"""Zoo entries written in plain PyTorch: MLP, 1d/3d CNNs, recurrent nets, a U-Net, attention built from
``nn.MultiheadAttention`` and from functional ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import tiny_transformer
from . import Built, register


def _seeded(model: nn.Module) -> nn.Module:
    return model.eval()


@register("mlp", "other")
def mlp() -> Built:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5))
    return model.eval(), (torch.randn(4, 16),), {}


class CNN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(3, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 4),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register("cnn1d", "audio")
def cnn1d() -> Built:
    torch.manual_seed(0)
    return CNN1d().eval(), (torch.randn(2, 3, 64),), {}


class CNN3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register("cnn3d", "vision")
def cnn3d() -> Built:
    torch.manual_seed(0)
    return CNN3d().eval(), (torch.randn(2, 1, 8, 16, 16),), {}


class Recurrent(nn.Module):
    """A sequence classifier over an LSTM or GRU (unrolled over time by export)."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(12, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@register("lstm", "text")
def lstm() -> Built:
    torch.manual_seed(0)
    return Recurrent(nn.LSTM).eval(), (torch.randn(2, 6, 12),), {}


@register("gru", "text")
def gru() -> Built:
    torch.manual_seed(0)
    return Recurrent(nn.GRU).eval(), (torch.randn(2, 6, 12),), {}


class UNet(nn.Module):
    """A two-level U-Net: conv blocks, max-pool down, transposed-conv up, skip concatenation."""

    def __init__(self, c: int = 8):
        super().__init__()

        def block(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU())

        self.down1, self.down2, self.mid = block(3, c), block(c, 2 * c), block(2 * c, 4 * c)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2), block(4 * c, 2 * c)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2), block(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        m = self.mid(F.max_pool2d(d2, 2))
        u2 = self.dec2(torch.cat([self.up2(m), d2], 1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], 1))
        return self.out(u1).mean((2, 3))  # per-class score of the segmentation map


@register("unet", "vision")
def unet() -> Built:
    torch.manual_seed(0)
    return UNet().eval(), (torch.randn(2, 3, 32, 32),), {}


class MHAClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.head(h.mean(1))


@register("multihead-attention", "text", attention=True)
def multihead_attention() -> Built:
    torch.manual_seed(0)
    return MHAClassifier().eval(), (torch.randn(2, 7, 32),), {}


class Functional(nn.Module):
    """Functional ops in one model: SDPA with a mask, cat / split / chunk, in-place ops, einsum,
    where-masking, interpolation, group and instance norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gn(self.stem(x))
        h = F.relu_(h)  # in place
        h = h + F.interpolate(F.avg_pool2d(h, 2), scale_factor=2.0, mode="bilinear", align_corners=False)
        a, b = torch.chunk(self.inorm(h), 2, dim=1)
        h = torch.cat([a, b * 0.5], 1)
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, 8)
        q, k, v = self.qkv(tokens).split(8, dim=-1)
        mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool, device=x.device).tril()
        att = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask)
        pooled = torch.einsum("bnd->bd", att.squeeze(1)) / tokens.shape[1]
        gate = torch.where(pooled > 0, pooled, torch.zeros_like(pooled))
        return self.head(torch.cat([pooled, gate], -1))


@register("functional-ops", "other")
def functional_ops() -> Built:
    torch.manual_seed(0)
    return Functional().eval(), (torch.randn(2, 3, 8, 8),), {}


@register("tiny-transformer", "text", attention=True)
def tiny() -> Built:
    return tiny_transformer(), (torch.randint(0, 64, (2, 12)),), {}
