"""Zoo entries from torchvision (``weights=None``), at small widths or inputs where the architecture
allows; batch norms get random statistics (a fresh eval-mode batch norm is the identity)."""

from __future__ import annotations

import torch
from torch import nn

from . import Built, register


def _prepared(model: nn.Module) -> nn.Module:
    """Eval mode, batch-norm statistics made non-trivial, zero-initialized heads made non-zero."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.1, generator=g)
    return model.eval()


def _images(size: int = 32, batch: int = 2) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)),)


def _vgg16(batch_norm: bool) -> nn.Module:
    """VGG16's layer layout (13 convolutions in 5 stages, 3 dense layers) at 1/8 width."""
    from torchvision.models.vgg import make_layers

    cfg = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]
    return nn.Sequential(
        make_layers(cfg, batch_norm=batch_norm),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(),
        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(),
        nn.Linear(64, 10),
    )


@register("vgg16", "vision", paper=True, needs="torchvision")
def vgg16() -> Built:
    torch.manual_seed(0)
    return _prepared(_vgg16(False)), _images(), {}


@register("vgg16-bn", "vision", paper=True, needs="torchvision")
def vgg16_bn() -> Built:
    torch.manual_seed(0)
    return _prepared(_vgg16(True)), _images(), {}


@register("resnet50", "vision", paper=True, needs="torchvision")
def resnet50() -> Built:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    return _prepared(resnet50(num_classes=10)), _images(64), {}


@register("vit-b16", "vision", paper=True, needs="torchvision", attention=True)
def vit_b16() -> Built:
    """ViT-B/16's structure (16x16 patches, class token, pre-norm blocks) with 2 narrow layers."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    return _prepared(model), _images(), {}


@register("efficientnet-v2", "vision", paper=True, needs="torchvision")
def efficientnet_v2() -> Built:
    """EfficientNetV2-S's block types (Fused-MBConv stages, then MBConv with squeeze-excitation and
    stochastic depth) with one layer per stage and the first four stages."""
    from dataclasses import replace

    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    torch.manual_seed(0)
    settings, _ = _efficientnet_conf("efficientnet_v2_s")
    settings = [replace(s, num_layers=1) for s in settings[:4]]
    model = EfficientNet(settings, dropout=0.2, last_channel=128, num_classes=10)
    return _prepared(model), _images(32), {}


@register("mobilenet-v3", "vision", needs="torchvision")
def mobilenet_v3() -> Built:
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    return _prepared(mobilenet_v3_small(num_classes=10)), _images(32), {}


@register("densenet", "vision", needs="torchvision")
def densenet() -> Built:
    """DenseNet's structure (batch norm before conv, concatenated features) at a small growth rate."""
    from torchvision.models import DenseNet

    torch.manual_seed(0)
    return _prepared(DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10)), _images(), {}


@register("convnext", "vision", needs="torchvision")
def convnext() -> Built:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    settings = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]
    return _prepared(ConvNeXt(settings, num_classes=10)), _images(), {}


@register("swin", "vision", needs="torchvision", attention=True)
def swin() -> Built:
    from torchvision.models import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10)
    return _prepared(model), _images(32), {}
