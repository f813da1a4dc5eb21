"""Small models of the architectures users bring (residual CNNs, a MobileNet block, a transformer)."""
import torch
from torch import nn


class Block2d(nn.Module):
    def __init__(self, cin, cout, stride=1, conv=nn.Conv2d, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet2d(nn.Module):
    def __init__(self, in_channels=1, channels=8, n_classes=10, conv=nn.Conv2d, bn=nn.BatchNorm2d, pool=nn.AdaptiveAvgPool2d):
        super().__init__()
        self.stem = nn.Sequential(conv(in_channels, channels, 3, padding=1, bias=False), bn(channels), nn.ReLU())
        self.layer1 = Block2d(channels, channels, 1, conv, bn)
        self.layer2 = Block2d(channels, 2 * channels, 2, conv, bn)
        self.pool = pool(1)
        self.fc = nn.Linear(2 * channels, n_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNet1d(ResNet2d):
    def __init__(self, in_channels=1, channels=8, n_classes=10):
        super().__init__(in_channels, channels, n_classes, nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d)


class MobileNetBlockNet(nn.Module):
    def __init__(self, in_channels=1, channels=8, n_classes=10, expand=4):
        super().__init__()
        h = channels * expand
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(channels, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(x.mean((2, 3)))


class TransformerClassifier(nn.Module):
    def __init__(self, n_features=8, seq_len=8, d_model=32, n_heads=4, dim_feedforward=64, n_layers=2, n_classes=10):
        super().__init__()
        self.embed = nn.Linear(n_features, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))
