"""The registered model, as MLflow "models from code": MLflow copies this file into the
model and runs it at load time, so a served model needs numpy, pandas and its runtime
(onnxruntime for an `onnx` artifact, torch for a `torchscript` one), not this project. Not
imported by the project (it calls `set_model` when run).

Input: a DataFrame of the raw columns the model was trained on (text columns as strings).
The encoding of text columns and empty cells (tasks/compress/tabular.py, rebuilt from the JSON spec
in `preprocess.json`; shipped as `tabular.py` in the model's code) and the standardization
fitted at training time are applied here, so callers never repeat them; a model of integer
features (token ids: `dtype` int64 in `preprocess.json`) gets them as int64. An empty cell in a
column the model has no imputer for is refused with one line naming the column and row.
Output: `prediction` (the original class label) and one `proba_<label>` column per class; for
a regression model (`task` in `preprocess.json`) `prediction` alone, the model's one output in
the label's units (`* target_scale + target_mean`, the standardization of the training target).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class Classifier(PythonModel):
    def load_context(self, context) -> None:
        if "onnx" in context.artifacts:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            session = ort.InferenceSession(
                context.artifacts["onnx"], opts, providers=["CPUExecutionProvider"]
            )
            name = session.get_inputs()[0].name
            self.logits = lambda z: session.run(None, {name: z})[0]
        else:
            import torch

            module = torch.jit.load(context.artifacts["torchscript"], map_location="cpu").eval()

            def logits(z):
                with torch.inference_mode():
                    return module(torch.from_numpy(z)).numpy()

            self.logits = logits
        with open(context.artifacts["preprocess"]) as f:
            meta = json.load(f)
        from tabular import build, needs_sklearn  # this model's code (code_paths)

        self.spec = meta["encoding"]
        self.transformer = build(self.spec) if needs_sklearn(self.spec) else None
        self.mean = np.asarray(meta["mean"], dtype=np.float64)
        self.scale = np.asarray(meta["scale"], dtype=np.float64)
        self.dtype = np.dtype(meta.get("dtype", "float32"))  # int64: token ids, not standardized
        self.classes = meta["classes"]
        self.regression = meta.get("task") == "regression"
        self.target_mean = float(meta.get("target_mean", 0.0))
        self.target_scale = float(meta.get("target_scale", 1.0))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from tabular import encode, first_bad_cell

        frame = pd.DataFrame(model_input)
        missing = [c["name"] for c in self.spec["columns"] if c["name"] not in frame.columns]
        if missing:
            raise ValueError(f"missing column(s) {', '.join(map(repr, missing))}")
        bad = first_bad_cell(self.spec, frame)
        if bad is not None:
            raise ValueError(bad)
        X = encode(self.spec, frame, self.transformer)
        z = (X - self.mean) / self.scale
        z = np.rint(z).astype(self.dtype) if self.dtype.kind in "iu" else z.astype(np.float32)
        logits = self.logits(z).astype(np.float64)
        if self.regression:
            return pd.DataFrame({"prediction": logits[:, 0] * self.target_scale + self.target_mean})
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        proba /= proba.sum(axis=1, keepdims=True)
        out = pd.DataFrame({"prediction": np.asarray(self.classes)[proba.argmax(axis=1)]})
        for i, label in enumerate(self.classes):
            out[f"proba_{label}"] = proba[:, i]
        return out


set_model(Classifier())
