"""A user's model and rows for the API's tests (imports nothing of distill, Prefect or MLflow:
a test's fresh process imports it as a notebook would its own code)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

FAST = {  # a whole pipeline in seconds
    "reduce": {"calibration_samples": 256},
    "finetune": {"epochs": 2},
    "compress": {"prune": {"recovery_epochs": 1}},
    "evaluate": {"latency_repeats": 3, "large_batch": 32, "plots": False},
}


def _digits(n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    X, y = (X[: n + 300] / 16).astype(np.float32), y[: n + 300]
    return X[:n], y[:n], X[n:], y[n:]


def _trained_mlp(X: np.ndarray, y: np.ndarray) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        opt.step()
    return model
