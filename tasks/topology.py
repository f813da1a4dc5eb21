"""Which layers of a sequential model can be made narrower, and what a narrower model costs.

A *hidden* layer is a Linear/Conv whose outputs reach the next Linear/Conv only through
elementwise modules (activations, dropout) and possibly a Flatten: dropping some of its
units (neurons, or channels) only removes the matching inputs of that next layer, the
*consumer*. Width-mode reduction works on these pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tasks.errors import UserError

REDUCIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class HiddenLayer:
    index: int  # position of the layer in the Sequential
    after: int  # position of the last elementwise module after it (its activations' output)
    consumer: int  # position of the next Linear/Conv
    width: int  # units (out_features / out_channels)
    per_unit: int  # consumer inputs per unit: 1, or the spatial size when a Flatten sits between

    @property
    def name(self) -> str:
        return str(self.index)


def units(layer: nn.Module) -> tuple[int, int]:
    """(input units, output units) of a Linear/Conv."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def hidden_chain(model: nn.Module) -> list[HiddenLayer]:
    if not isinstance(model, nn.Sequential):
        raise UserError("reconstruct.mode=width needs an nn.Sequential teacher (the built-in mlp/cnn); "
                        "use reconstruct.mode=low_rank for other models")
    positions = [i for i, m in enumerate(model) if isinstance(m, REDUCIBLE)]
    chain = []
    for i, j in zip(positions, positions[1:]):
        between = list(model)[i + 1:j]
        if not all(isinstance(m, (*ELEMENTWISE, nn.Flatten)) for m in between):
            continue  # something mixes units in between (pooling, normalization): leave the pair alone
        _, width = units(model[i])
        consumer_in, _ = units(model[j])
        if consumer_in % width:
            continue
        last_elementwise = max([i] + [i + 1 + n for n, m in enumerate(between) if isinstance(m, ELEMENTWISE)])
        chain.append(HiddenLayer(index=i, after=last_elementwise, consumer=j, width=width,
                                 per_unit=consumer_in // width))
    return chain


def width_params(model: nn.Sequential, widths: dict[int, int]) -> int:
    """Parameters of the model once hidden layer `index` keeps `widths[index]` units."""
    chain = {h.index: h for h in hidden_chain(model)}
    consumers = {h.consumer: h for h in chain.values()}
    total = sum(p.numel() for m in model if not isinstance(m, REDUCIBLE) for p in m.parameters())
    for i, layer in enumerate(model):
        if not isinstance(layer, REDUCIBLE):
            continue
        n_in, n_out = units(layer)
        fan_per_in = layer.weight[0].numel() // n_in  # kernel size, 1 for Linear
        if i in consumers:  # its inputs shrink with the producer's units
            h = consumers[i]
            n_in, fan_per_in = widths.get(h.index, h.width), fan_per_in * h.per_unit
        out = widths.get(i, n_out)
        total += out * n_in * fan_per_in + (out if layer.bias is not None else 0)
    return total
