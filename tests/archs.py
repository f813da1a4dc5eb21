"""The architectures the engine is tested on, wrapped as the pipeline wraps a user's module
(flat rows in, `nn.Unflatten` to the data's shape), with BatchNorm statistics that matter."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from tests import zoo

# name -> (module factory, input shape of one row)
ARCHS = {
    "resnet2d": (lambda: zoo.ResNet2d(in_channels=1, channels=8, n_classes=5), (1, 8, 8)),
    "resnet1d": (lambda: zoo.ResNet1d(in_channels=2, channels=8, n_classes=5), (2, 32)),
    "mobilenet": (lambda: zoo.MobileNetBlockNet(in_channels=1, channels=8, n_classes=5), (1, 8, 8)),
    "inception": (lambda: zoo.InceptionNet(in_channels=1, channels=6, n_classes=5), (1, 6, 6)),
    "tokens": (lambda: zoo.TokenClassifier(vocab=16, dim=12, hidden=24, n_classes=5), (10,)),
    "transformer": (
        lambda: zoo.TransformerClassifier(
            n_features=6,
            seq_len=8,
            d_model=32,
            n_heads=4,
            dim_feedforward=64,
            n_layers=2,
            n_classes=5,
        ),
        (8, 6),
    ),
}


def wrapped(arch: str, seed: int = 0) -> tuple[nn.Module, np.ndarray]:
    """(the model in eval mode taking flat rows, 256 calibration rows)."""
    factory, shape = ARCHS[arch]
    torch.manual_seed(seed)
    module = factory()
    model = (
        nn.Sequential(OrderedDict(input=nn.Unflatten(1, shape), model=module))
        if len(shape) > 1
        else nn.Sequential(OrderedDict(model=module))
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0, 0.2)
            if isinstance(m, zoo.TransformerClassifier):
                m.pos.normal_(0, 0.5)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(256, int(np.prod(shape)))).astype(np.float32)
    if arch == "tokens":
        X = rng.integers(0, 16, size=X.shape).astype(np.float32)
    return model.eval(), X
