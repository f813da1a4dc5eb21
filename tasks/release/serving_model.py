"""The registered model, as MLflow "models from code": MLflow copies this file into the
model and runs it at load time, so a served model needs numpy, pandas and its runtime
(onnxruntime for an `onnx` artifact, torch for a `torchscript` one), not this project. Not
imported by the project (it calls `set_model` when run).

Input (`input` in `preprocess.json`, the signature's kind: tasks/release/signature.py): the
user's own array (`tensor`: rows of numbers in their shape and dtype, flattened here as the
model takes them), or a DataFrame of the raw columns the model was trained on (`columns`: a
table with text columns, text as strings; versions registered before tensor signatures). The
encoding of text columns and empty cells (tasks/compress/tabular.py, rebuilt from the JSON spec
in `preprocess.json`; shipped as `tabular.py` in the model's code) and the standardization
fitted at training time are applied here, so callers never repeat them; a model of integer
features (token ids: `dtype` int64 in `preprocess.json`) gets them as int64, never
standardized. An empty cell (NaN) in a column the model has no imputer for, or inf, is refused
with one line naming the column and row.
A model of token ids with attention masks (its ONNX graph takes `input_ids` and
`attention_mask`) takes a dict of both arrays.
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
            names = [i.name for i in session.get_inputs()]
            self.logits = lambda *z: session.run(None, dict(zip(names, z, strict=True)))[0]
        else:
            import torch

            module = torch.jit.load(context.artifacts["torchscript"], map_location="cpu").eval()

            def logits(z, mask=None):
                if mask is not None:  # ids and mask folded, as the module was traced on
                    z = np.where(mask != 0, z, ~z)
                with torch.inference_mode():
                    return module(torch.from_numpy(z)).numpy()

            self.logits = logits
        with open(context.artifacts["preprocess"]) as f:
            meta = json.load(f)
        from tabular import build, needs_sklearn  # this model's code (code_paths)

        self.tensor = meta.get("input") == "tensor"  # older versions: columns
        self.features = meta["features"]  # the raw columns, in order (an array's: x0, x1, ...)
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
        """`model_input`: a DataFrame of the raw columns, or the ndarray a tensor signature names
        (MLflow validates it against the signature; it infers nothing from this hint)."""
        if isinstance(model_input, dict):  # input_ids and attention_mask, as the signature says
            ids = np.asarray(model_input["input_ids"])
            mask = np.asarray(model_input["attention_mask"]).reshape(len(ids), -1)
            z = ids.reshape(len(ids), -1).astype(np.int64)
            return self.answers(self.logits(z, mask.astype(np.int64)).astype(np.float64))
        if self.tensor:
            X = self.flat(np.asarray(model_input))
        else:
            X = self.encoded(pd.DataFrame(model_input))
        if self.dtype.kind in "iu":  # token ids, as given (never standardized)
            z = (np.rint(X) if X.dtype.kind == "f" else X).astype(self.dtype)
        else:
            z = ((X.astype(np.float64, copy=False) - self.mean) / self.scale).astype(np.float32)
        return self.answers(self.logits(z).astype(np.float64))

    def answers(self, logits: np.ndarray) -> pd.DataFrame:
        """The model's outputs as the user reads them: classes and probabilities, or values."""
        if self.regression:
            return pd.DataFrame({"prediction": logits[:, 0] * self.target_scale + self.target_mean})
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        proba /= proba.sum(axis=1, keepdims=True)
        out = pd.DataFrame({"prediction": np.asarray(self.classes)[proba.argmax(axis=1)]})
        for i, label in enumerate(self.classes):
            out[f"proba_{label}"] = proba[:, i]
        return out

    def flat(self, X: np.ndarray) -> np.ndarray:
        """The user's array (MLflow checked its shape and dtype) as rows of the model's features:
        flattened; through the encoding where it imputes empty cells, or to name a bad cell."""
        X = X.reshape(len(X), -1)
        if X.dtype.kind == "f" and (self.transformer is not None or not np.isfinite(X).all()):
            return self.encoded(pd.DataFrame(X, columns=self.features))
        return X

    def encoded(self, frame: pd.DataFrame) -> np.ndarray:
        """The raw columns as the model's features (text and empty cells encoded)."""
        from tabular import encode, first_bad_cell

        missing = [c["name"] for c in self.spec["columns"] if c["name"] not in frame.columns]
        if missing:
            raise ValueError(f"missing column(s) {', '.join(map(repr, missing))}")
        bad = first_bad_cell(self.spec, frame)
        if bad is not None:
            raise ValueError(bad)
        return encode(self.spec, frame, self.transformer)


set_model(Classifier())
