import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

from distill.tasks.compress.graph import keep_units, param_model, trace
from tests.archs import ARCHS, wrapped


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet_groups_follow_the_residual_stream():
    model, X = wrapped("resnet2d")
    graph = trace(model, torch.from_numpy(X[:2]))
    groups = {g.name: g for g in graph.groups}
    stream = groups["model.stem.0"]
    # the stem and the first block's last conv write one stream; three convs read it
    assert stream.producers == ("model.stem.0", "model.layer1.conv2")
    assert [r.name for r in stream.readers] == [
        "model.layer1.conv1",
        "model.layer2.conv1",
        "model.layer2.downsample.0",
    ]
    assert {"model.stem.1", "model.layer1.bn2"} <= set(stream.members)
    # the second stage's stream: written by the main path and the 1x1 shortcut, read by the head
    out = groups["model.layer2.conv2"]
    assert set(out.producers) == {"model.layer2.conv2", "model.layer2.downsample.0"}
    assert [r.name for r in out.readers] == ["model.fc"]
    assert not groups["model.fc"].reducible and "model output" in groups["model.fc"].why_not
    assert [g.name for g in graph.reducible()] == [
        "model.stem.0",
        "model.layer1.conv1",
        "model.layer2.conv1",
        "model.layer2.conv2",
    ]


def test_transformer_groups_keep_heads_whole():
    model, X = wrapped("transformer")
    graph = trace(model, torch.from_numpy(X[:2]))
    groups = {g.name: g for g in graph.groups}
    stream = groups["model.embed"]
    assert stream.step == 4  # 4 heads: units go in fours, one per head
    assert {r.kind for r in stream.readers} == {"attention", "linear"}
    assert "model.pos" in stream.members and "model.encoder.layers.0.norm1" in stream.members
    ffn = groups["model.encoder.layers.0.linear1"]
    assert ffn.step == 1 and [r.name for r in ffn.readers] == ["model.encoder.layers.0.linear2"]


def test_depthwise_conv_passes_its_channels_through():
    model, X = wrapped("mobilenet")
    groups = {g.name: g for g in trace(model, torch.from_numpy(X[:2])).groups}
    hidden = groups["model.block.expand.0"]
    assert "model.block.depthwise.0" in hidden.members and [r.name for r in hidden.readers] == [
        "model.block.project.0"
    ]
    assert hidden.reducible


def test_a_flattened_channel_is_read_as_all_its_positions():
    model = nn.Sequential(
        nn.Unflatten(1, (2, 4, 4)),
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 5),
    )
    group = trace(model, torch.randn(2, 32)).group("1")
    assert group.readers[0].positions == tuple(tuple(range(16 * j, 16 * (j + 1))) for j in range(3))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_param_model_counts_the_real_narrower_model(arch):
    """The budget's cost model, measured on the model, is exact for any widths."""
    model, X = wrapped(arch)
    example = torch.from_numpy(X[:2])
    cost = param_model(model, example)
    assert cost.params() == _n_params(model)
    rng = random.Random(0)
    for _ in range(3):
        student = copy.deepcopy(model)
        graph = trace(student, example)
        widths = {}
        for g in graph.reducible():
            block = g.width // g.step
            per = rng.randint(1, block)
            keep = [
                b * block + j for b in range(g.step) for j in sorted(rng.sample(range(block), per))
            ]
            keep_units(graph, g, keep)
            widths[g.name] = len(keep)
        assert cost.params(widths) == _n_params(student)
        assert student(example).shape == (2, 5)


def test_removed_units_leave_the_kept_ones_exact():
    """Surgery only removes: a kept channel of the expand layer computes what it did."""
    model, X = wrapped("mobilenet")
    student = copy.deepcopy(model)
    graph = trace(student, torch.from_numpy(X[:2]))
    group = graph.group("model.block.expand.0")
    keep = np.arange(0, group.width, 3)
    removed = keep_units(graph, group, keep)
    assert removed["model.block.expand.0"] == [j for j in range(group.width) if j not in set(keep)]
    x = torch.from_numpy(X[:16])
    with torch.no_grad():
        before = model.model.block.expand(model.model.stem(model.input(x)))
        after = student.model.block.expand(student.model.stem(student.input(x)))
        assert torch.equal(after, before[:, keep])
        # the depthwise conv went along, channel for channel
        assert student.model.block.depthwise[0].weight.shape[0] == len(keep)
        assert torch.equal(
            student.model.block.depthwise(after), model.model.block.depthwise(before)[:, keep]
        )
