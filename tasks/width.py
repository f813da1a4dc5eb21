"""Width-mode reconstruction: keep k units of each hidden layer, re-fit the next layer.

Layer by layer, in order (ThiNet / He et al. 2017 style, on calibration rows):
1. choose k units of the hidden layer from the *student's* activations so far (so the
   errors of earlier layers are seen and corrected): by pivoted QR on the top-k PCA
   loadings (`pqr`, the units that best span the principal subspace), or by `importance`
   (mean squared activation × squared norm of the consumer's weights on that unit);
2. drop the other units (rows of the layer);
3. re-fit the consumer by ridge least squares so that, from the kept activations, it
   reproduces the *teacher's* consumer outputs: min ‖[A 1] W̃ − Z‖² + λ‖W‖² (bias free).
   The normal equations are accumulated over calibration batches (memory-bounded).

The result is a plain, narrower dense network: smaller and faster, not masked.
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from tasks.reduce import Basis, Reduction, collect_bases
from tasks.topology import HiddenLayer, hidden_chain, units


def _batches(X: np.ndarray, size: int):
    for start in range(0, len(X), size):
        yield torch.from_numpy(X[start:start + size])


def activation_importance(model: nn.Sequential, h: HiddenLayer, basis: Basis) -> np.ndarray:
    """E[a_j²] · ‖W_consumer[:, j]‖² per unit j: how much each unit feeds into the next layer."""
    energy = basis.explained_variance @ (basis.components**2).T + basis.mean**2  # diag of E[a aᵀ]
    W = model[h.consumer].weight.detach()
    return energy * W.reshape(W.shape[0], h.width, -1).pow(2).sum(dim=(0, 2)).double().numpy()


def activation_basis(model: nn.Sequential, h: HiddenLayer, X: np.ndarray, batch_size: int = 256) -> Basis:
    return collect_bases(model, X, batch_size, taps={h.name: model[h.after]})[h.name]


def select_units(student: nn.Sequential, h: HiddenLayer, k: int, X: np.ndarray, how: str,
                 batch_size: int = 256) -> np.ndarray:
    """Indices (sorted) of the k units of hidden layer h to keep."""
    basis = activation_basis(student, h, X, batch_size)
    if how == "pqr":
        _, _, pivots = scipy.linalg.qr(basis.components[:, :k].T, pivoting=True, mode="economic")
        return np.sort(pivots[:k])
    return np.sort(np.argsort(-activation_importance(student, h, basis))[:k])


def _consumer_inputs(consumer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Rows of the consumer's linear map: flat features (Linear) or unfolded patches (Conv)."""
    if isinstance(consumer, nn.Linear):
        return a.reshape(a.shape[0], -1)
    if isinstance(consumer, nn.Conv1d):
        a = a.unsqueeze(2)
        kernel, pad, stride, dil = (1, *consumer.kernel_size), (0, *consumer.padding), (1, *consumer.stride), (1, *consumer.dilation)
    else:
        kernel, pad, stride, dil = consumer.kernel_size, consumer.padding, consumer.stride, consumer.dilation
    cols = F.unfold(a, kernel, dilation=dil, padding=pad, stride=stride)  # (N, C·k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _consumer_targets(consumer: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return z if isinstance(consumer, nn.Linear) else z.movedim(1, -1).reshape(-1, z.shape[1])


@torch.no_grad()
def refit_consumer(student: nn.Sequential, teacher: nn.Sequential, h: HiddenLayer, X: np.ndarray,
                   ridge: float, batch_size: int = 256) -> nn.Module:
    """Ridge least-squares weights for the consumer of h, from the student's activations
    (input of the consumer) to the teacher's consumer outputs."""
    consumer = student[h.consumer]
    G = R = None
    for xb in _batches(X, batch_size):
        A = _consumer_inputs(consumer, student[:h.consumer](xb)).double()
        Z = _consumer_targets(consumer, teacher[:h.consumer + 1](xb)).double()
        A1 = torch.cat([A, torch.ones(A.shape[0], 1, dtype=A.dtype)], dim=1)
        G = A1.T @ A1 if G is None else G + A1.T @ A1
        R = A1.T @ Z if R is None else R + A1.T @ Z
    d = G.shape[0] - 1
    lam = ridge * torch.trace(G[:d, :d]) / max(d, 1)
    reg = torch.diag(torch.cat([torch.full((d,), float(lam), dtype=G.dtype), torch.zeros(1, dtype=G.dtype)]))
    solution = torch.linalg.lstsq(G + reg, R).solution  # (d+1, out); lstsq copes with dead units
    n_in, n_out = units(consumer)
    new = copy.deepcopy(consumer)
    new.weight = nn.Parameter(solution[:d].T.reshape(n_out, -1, *consumer.weight.shape[2:]).float().contiguous())
    new.bias = nn.Parameter(solution[d].float())
    if isinstance(new, nn.Linear):
        new.in_features = d
    else:
        new.in_channels = new.weight.shape[1]
    return new


def _keep_rows(layer: nn.Module, keep: np.ndarray) -> nn.Module:
    idx = torch.from_numpy(keep).long()
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(layer.weight.detach()[idx].clone())
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach()[idx].clone())
    if isinstance(new, nn.Linear):
        new.out_features = len(keep)
    else:
        new.out_channels = len(keep)
    return new


def _keep_inputs(consumer: nn.Module, keep: np.ndarray, per_unit: int) -> nn.Module:
    """The consumer without the inputs of dropped units (per_unit > 1: a Flatten in between)."""
    cols = torch.from_numpy((keep[:, None] * per_unit + np.arange(per_unit)).ravel()).long()
    new = copy.deepcopy(consumer)
    new.weight = nn.Parameter(consumer.weight.detach()[:, cols].clone())
    if isinstance(new, nn.Linear):
        new.in_features = len(cols)
    else:
        new.in_channels = len(cols)
    return new


def remove_units(model: nn.Sequential, h: HiddenLayer, keep: np.ndarray) -> None:
    """Physically remove the other units of hidden layer h: its rows and the consumer's inputs.
    Kept units compute exactly what they computed before."""
    model[h.index] = _keep_rows(model[h.index], keep)
    model[h.consumer] = _keep_inputs(model[h.consumer], keep, h.per_unit)


def reconstruct_width(teacher: nn.Sequential, reduction: Reduction, X: np.ndarray, how: str = "pqr",
                      ridge: float = 1e-4, batch_size: int = 256) -> nn.Sequential:
    """A narrower copy of the teacher: planned hidden layers keep `rank` units, consumers re-fit."""
    student = copy.deepcopy(teacher).eval()
    widths = {p.name: p.rank for p in reduction.layers}
    for h in hidden_chain(teacher):
        k = widths.get(h.name)
        if k is None or k >= h.width:
            continue
        keep = select_units(student, h, k, X, how, batch_size)
        student[h.index] = _keep_rows(student[h.index], keep)
        # the consumer now sees k units; re-fit it on what it sees
        student[h.consumer] = refit_consumer(student, teacher, h, X, ridge, batch_size)
    return student.eval()
