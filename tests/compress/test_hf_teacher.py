"""Hugging Face teachers (`teacher.source: hf:DIR`, tasks/compress/hf.py): tiny models built from
config objects and `save_pretrained` to tmp_path (no hub here), loaded, refused in one line when
they cannot be, their int64 token ids kept through every stage, and the pipeline run end to end
on them (low-rank reconstruction and unstructured pruning: the stages that need no transformer
surgery), in-process and through `distill run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import (
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.hf import HFLogits, hf_model
from distill.tasks.compress.masks import unfold
from distill.tasks.compress.pipeline import PLAIN_STEPS, compress
from distill.tasks.compress.teacher import check_teacher, load_teacher
from distill.tasks.platform.config import DataConfig, TeacherConfig, build_config
from distill.tasks.platform.errors import UserError
from tests.conftest import ROOT, TINY, fresh_process
from tests.served import BLOCK_IMPORTS, NOTHING_BLOCKED_LOADED
from tests.tokens import tiny_bert

VOCAB, T = 100, 12


def _bert(n_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return tiny_bert(n_classes=n_labels, vocab_size=VOCAB, max_position_embeddings=32)


def _vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def _gpt2(cls=GPT2LMHeadModel, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32, **extra)
    return cls(config).eval()


def _ids(n: int, seed: int = 0, pad_from: int | None = T - 3) -> np.ndarray:
    """Token ids 1..VOCAB-1, int64 [n, T]; every other row right-padded with 0 (BERT's [PAD])."""
    rng = np.random.default_rng(seed)
    X = rng.integers(1, VOCAB, size=(n, T), dtype=np.int64)
    if pad_from is not None:
        X[::2, pad_from:] = 0
    return X


def _labelled(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The teacher's own answers as labels (its accuracy is 1: students have something to keep),
    every class among them: its head's bias is centred on these rows first."""
    wrapped = HFLogits(model, "sequence classification" if x.dtype == torch.int64 else "images")
    head = model.get_output_embeddings() or model.classifier
    with torch.no_grad():
        head.bias -= wrapped(x).mean(0)
        return wrapped(x).argmax(1).numpy()


def _split_npz(path: Path, X: np.ndarray, y: np.ndarray) -> Path:
    k = int(0.75 * len(X))
    np.savez(path, X_train=X[:k], y_train=y[:k], X_test=X[k:], y_test=y[k:])
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT's save_pretrained directory and an npz of int64 ids it labelled."""
    root = tmp_path_factory.mktemp("bert")
    model = _bert()
    X = _ids(320)
    y = _labelled(model, torch.from_numpy(X))
    model.save_pretrained(root / "teacher")
    return root / "teacher", _split_npz(root / "ids.npz", X, y)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ViT on 1x8x8 images and an npz of [N, 1, 8, 8] float32 images it labelled."""
    root = tmp_path_factory.mktemp("vit")
    model = _vit()
    X = np.random.default_rng(1).normal(size=(240, 1, 8, 8)).astype(np.float32)
    y = _labelled(model, torch.from_numpy(X))
    model.save_pretrained(root / "teacher")
    return root / "teacher", _split_npz(root / "images.npz", X, y)


def _data(npz: Path, source: str = "hf:x", **data: object):
    cfg = build_config({"data": {"source": f"npz:{npz}", **data}}, [f"teacher.source={source}"])
    return load_dataset(cfg.data, 0)


# --- loading --------------------------------------------------------------------------------


def test_bert_directory_loads_wrapped_with_its_own_logits(bert_dir):
    teacher_dir, npz = bert_dir
    data = _data(npz)
    assert data.X_train.dtype == np.int64 and np.array_equal(data.mean, np.zeros(T))
    teacher = load_teacher(TeacherConfig(source=f"hf:{teacher_dir}"), data, seed=0)
    assert isinstance(teacher, HFLogits) and not teacher.training
    hf = hf_model(teacher)
    assert type(hf).__name__ == "BertForSequenceClassification" and hf_model(hf) is hf
    assert hf.config._attn_implementation == "sdpa"  # SDPA kept, not forced to eager
    assert all(k.startswith(("hf.bert.", "hf.classifier.")) for k in teacher.state_dict())
    x = torch.from_numpy(data.X_test)
    direct = hf(input_ids=x, attention_mask=(x != 0).long()).logits
    assert torch.allclose(teacher(x), direct, atol=1e-6)
    # the mask comes from config.pad_token_id: a padded row answers as its unpadded tokens
    row = data.X_test[0][data.X_test[0] != 0]
    alone = hf(input_ids=torch.from_numpy(row)[None]).logits
    assert torch.allclose(teacher(x[:1]), alone, atol=1e-5)
    assert hf_model(torch.nn.Linear(2, 2)) is None


def test_vit_directory_takes_images_as_flat_rows_or_nchw(vit_dir):
    teacher_dir, npz = vit_dir
    data = _data(npz)
    assert data.input_shape == (1, 8, 8) and data.X_train.shape[1] == 64
    assert data.X_train.dtype == np.float32 and np.array_equal(data.scale, np.ones(64))
    teacher = load_teacher(TeacherConfig(source=f"hf:{teacher_dir}"), data, seed=0)
    images = torch.from_numpy(data.X_test).reshape(-1, 1, 8, 8)
    expected = hf_model(teacher)(pixel_values=images).logits
    assert torch.allclose(teacher(torch.from_numpy(data.X_test)), expected, atol=1e-6)
    assert torch.allclose(teacher(images), expected, atol=1e-6)
    # flat rows and no data.shape: the model's config gives the image's shape
    flat = _data(npz, shape=[64])
    assert flat.input_shape == (64,)
    loaded = load_teacher(TeacherConfig(source=f"hf:{teacher_dir}"), flat, seed=0)
    assert loaded.input_shape == (1, 8, 8)


def test_causal_lm_answers_the_last_real_token_over_the_class_tokens(tmp_path):
    lm = _gpt2(pad_token_id=0)
    lm.save_pretrained(tmp_path / "lm")
    X = _ids(120, seed=2)
    y = np.resize([7, 11, 42], len(X))  # the classes are token ids
    data = _data(_split_npz(tmp_path / "next.npz", X, y))
    teacher = load_teacher(TeacherConfig(source=f"hf:{tmp_path / 'lm'}"), data, seed=0)
    assert teacher.columns.tolist() == [7, 11, 42]
    for row in data.X_test[:2]:  # one padded row, one not
        real = torch.from_numpy(row[row != 0])[None]
        expected = lm(input_ids=real).logits[:, -1, [7, 11, 42]]
        assert torch.allclose(teacher(torch.from_numpy(row)[None]), expected, atol=1e-5)
    # labels that are no token ids of its vocabulary: one line
    bad = _data(_split_npz(tmp_path / "bad.npz", X, np.resize([1, 2, 500], len(X))))
    with pytest.raises(UserError, match="labels must be token ids below its vocabulary size 100"):
        load_teacher(TeacherConfig(source=f"hf:{tmp_path / 'lm'}"), bad, seed=0)


def test_gpt2_sequence_classifier_with_a_pad_token(tmp_path):
    model = _gpt2(GPT2ForSequenceClassification, num_labels=3, pad_token_id=0)
    model.save_pretrained(tmp_path / "gpt2")
    X = _ids(80, seed=3)
    data = _data(_split_npz(tmp_path / "ids.npz", X, np.resize([0, 1, 2], len(X))))
    teacher = load_teacher(TeacherConfig(source=f"hf:{tmp_path / 'gpt2'}"), data, seed=0)
    x = torch.from_numpy(data.X_test)
    expected = model(input_ids=x, attention_mask=(x != 0).long()).logits
    assert torch.allclose(teacher(x), expected, atol=1e-5)


# --- one-line refusals ------------------------------------------------------------------------


def _refused(source: str, data, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        check_teacher(TeacherConfig(source=source), data)
    assert "\n" not in str(err.value)


def test_refusals_are_one_line(tmp_path, bert_dir, monkeypatch):
    _, npz = bert_dir
    data = _data(npz)
    monkeypatch.chdir(tmp_path)
    hub = "save_pretrained it into a directory first and give hf:DIR"
    _refused(
        "hf:bert-base-uncased",
        data,
        rf"^config key 'teacher.source': hf:bert-base-uncased: no directory 'bert-base-uncased'; distill downloads no model \(hub ids included\): {hub}$",
    )
    _refused(f"hf:{tmp_path / 'absent'}", data, hub)
    _refused("hf:", data, hub)

    model = _bert()
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _refused(
        f"hf:{tmp_path / 'bin'}",
        data,
        r"holds pytorch_model.bin but no \*.safetensors: loading it would unpickle it \(runs code\)",
    )
    (tmp_path / "empty").mkdir()
    _refused(
        f"hf:{tmp_path / 'empty'}",
        data,
        "holds no config.json: not a directory written by save_pretrained",
    )
    (tmp_path / "file.txt").write_text("x")
    _refused(f"hf:{tmp_path / 'file.txt'}", data, "is a file; hf: takes a directory")

    # a base model has no head for a task: nothing to take logits from
    BertModel(model.config).save_pretrained(tmp_path / "base")
    _refused(
        f"hf:{tmp_path / 'base'}",
        data,
        "is a BertModel; distill takes sequence classification, image classification, causal LM models",
    )
    # a head missing from the weights would be random
    _gpt2().save_pretrained(tmp_path / "headless")
    config = json.loads((tmp_path / "headless" / "config.json").read_text())
    config |= {"architectures": ["GPT2ForSequenceClassification"], "pad_token_id": 0}
    (tmp_path / "headless" / "config.json").write_text(json.dumps(config))
    _refused(
        f"hf:{tmp_path / 'headless'}",
        data,
        r"has no weights for score.weight of its GPT2ForSequenceClassification \(1 missing\)",
    )
    # custom code is never run
    config |= {"architectures": ["MyOwnModel"], "auto_map": {"AutoModel": "my.MyOwnModel"}}
    (tmp_path / "headless" / "config.json").write_text(json.dumps(config))
    _refused(f"hf:{tmp_path / 'headless'}", data, "trust_remote_code stays off")

    # the data does not fit: 4 classes, 3 outputs
    four = _data(_split_npz(tmp_path / "four.npz", _ids(80), np.resize([0, 1, 2, 3], 80)))
    _refused(f"hf:{bert_dir[0]}", four, "outputs \\[3\\] per row, the data has 4 classes")


NO_TRANSFORMERS = """
import importlib, pkgutil, sys
sys.modules["transformers"] = None  # import transformers raises ImportError
import distill.tasks, distill.flows.cli
for pkg in ("distill.tasks.compress", "distill.tasks.platform", "distill.tasks.release"):
    for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
        if m.name != "serving_model":  # runs set_model() on import: MLflow's, not ours
            importlib.import_module(f"{pkg}.{m.name}")
from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.teacher import check_teacher
from distill.tasks.platform.config import build_config
from distill.tasks.platform.errors import UserError
cfg = build_config({}, ["teacher.hidden=[8]"])
data = load_dataset(cfg.data, 0)
check_teacher(cfg.teacher, data)  # a trained teacher needs no transformers
try:
    check_teacher(build_config({}, [f"teacher.source=hf:{sys.argv[1]}"]).teacher, data)
except UserError as err:
    print(err)
print("transformers" in sys.modules and sys.modules["transformers"] is None)
"""


def test_without_transformers_every_module_imports_and_hf_says_what_to_install(bert_dir):
    proc = subprocess.run(
        [sys.executable, "-c", NO_TRANSFORMERS, str(bert_dir[0])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == (
        "config key 'teacher.source': an hf: teacher needs transformers, which is not "
        "installed: pip install 'distill[hf]'"
    )
    assert lines[-1] == "True"


# --- the data and the config ----------------------------------------------------------------


def test_standardize_defaults_on_for_trained_teachers_only(tmp_path):
    for source, expected in (("train", True), ("hf:d", False), ("file:t.pt", False)):
        assert build_config({}, [f"teacher.source={source}"]).data.standardize is expected
    assert build_config({}, ["teacher.source=hf:d", "data.standardize=true"]).data.standardize
    assert not build_config({}, ["data.standardize=false"]).data.standardize
    assert build_config({}, ["data.standardize=null"]).data.standardize  # null: the default
    assert DataConfig().standardize  # a data config on its own: as before


def test_integer_features_stay_int64_unless_standardized(tmp_path, monkeypatch):
    X = _ids(60)
    path = _split_npz(tmp_path / "ids.npz", X, np.resize([0, 1], 60))
    kept = load_dataset(DataConfig(source=f"npz:{path}", standardize=False), 0)
    assert kept.X_train.dtype == kept.X_val.dtype == kept.X_test.dtype == np.int64
    rows = np.concatenate([kept.X_train, kept.X_val])
    assert np.array_equal(rows[np.lexsort(rows.T)], X[:45][np.lexsort(X[:45].T)])
    assert np.array_equal(kept.X_test, X[45:])
    scaled = load_dataset(DataConfig(source=f"npz:{path}"), 0)
    assert scaled.X_test.dtype == np.float32 and scaled.digest == kept.digest
    # a table large enough to stream stays in memory as int64 (the stream is float32)
    monkeypatch.setenv("DISTILL_STREAM_MIN_CELLS", "10")
    big = load_dataset(DataConfig(source=f"npz:{path}", standardize=False, val_size=0.11), 0)
    assert isinstance(big.X_train, np.ndarray) and big.X_train.dtype == np.int64


def test_a_trained_mlp_on_raw_integers_says_how_to_feed_floats(tmp_path):
    path = _split_npz(tmp_path / "ids.npz", _ids(60), np.resize([0, 1], 60))
    cfg = build_config({"data": {"source": f"npz:{path}"}}, ["data.standardize=false"])
    with pytest.raises(
        UserError,
        match=r"does not accept int64 inputs of shape \[2, 12\].*data.standardize: true gives float32\)$",
    ):
        check_teacher(cfg.teacher, load_dataset(cfg.data, 0))


# --- the pipeline -----------------------------------------------------------------------------

HF_TINY = [
    *TINY,
    "reconstruct.mode=low_rank",
    "compress.prune.method=unstructured",
    "reduce.budget.ratio=1.5",
    "reduce.calibration_samples=64",
    "finetune.epochs=1",
    "finetune.batch_size=32",
]


def _compress_seeing_dtypes(teacher_dir: Path, npz: Path, embedding: str):
    """`compress` on the hf: teacher, with a hook on its `embedding` (copied into every student)
    that records the dtype of what reaches it."""
    cfg = build_config({}, [*HF_TINY, f"teacher.source=hf:{teacher_dir}", f"data.source=npz:{npz}"])
    data = load_dataset(cfg.data, cfg.seed)
    seen: set[torch.dtype] = set()

    def teacher_step(*args, **kwargs):
        teacher, history = PLAIN_STEPS.teacher(*args, **kwargs)
        teacher.get_submodule(embedding).register_forward_pre_hook(
            lambda _m, args: seen.add(args[0].dtype)
        )
        return teacher, history

    from dataclasses import replace

    return compress(cfg, data, replace(PLAIN_STEPS, teacher=teacher_step)), seen


def _onnx_input(model) -> int:
    import onnx

    return onnx.load_from_string(model.onnx_bytes).graph.input[0].type.tensor_type.elem_type


@pytest.mark.slow
def test_bert_compresses_end_to_end_on_int64_ids(bert_dir):
    import onnx

    outcome, seen = _compress_seeing_dtypes(*bert_dir, "hf.bert.embeddings.word_embeddings")
    assert seen == {torch.int64}  # every stage's forward passes: ids, never floats
    stages = outcome.stages
    assert stages["teacher"]["accuracy"] == 1.0
    assert stages["reconstructed"]["params"] < stages["teacher"]["params"]
    assert stages["pruned"]["nonzeros"] < stages["finetuned"]["nonzeros"]
    assert stages["pruned"]["accuracy"] > 0.5
    # ONNX float and static int8 (calibrated on int64 ids) take an int64 input; what ships is
    # the measured choice (int8 only when smaller and no slower: tests/compress/test_quantize.py)
    q = outcome.quantized
    assert q.int8_candidate is not None and q.method in ("static", "fp32"), q.why
    assert (q.method == "static") == q.choice.int8_ships, q.why
    assert _onnx_input(q.float_model) == onnx.TensorProto.INT64
    assert _onnx_input(q.int8_candidate) == onnx.TensorProto.INT64
    assert _onnx_input(q.served) == onnx.TensorProto.INT64
    print(q.why)
    assert stages["quantized"]["export_max_abs_diff"] < 1e-3
    # what ships answers as the pruned student does, and well above chance (3 classes); how close
    # one epoch of KD gets to the teacher is the recipe's business (tests/compress/test_recipe.py)
    assert stages["quantized"]["accuracy"] == pytest.approx(stages["pruned"]["accuracy"], abs=0.05)
    assert stages["quantized"]["agreement"] > 0.5
    assert stages["teacher"]["flops"] > stages["reconstructed"]["flops"] > 0


def test_vit_compresses_end_to_end_on_images(vit_dir):
    outcome, seen = _compress_seeing_dtypes(*vit_dir, "hf.vit.embeddings.patch_embeddings")
    assert seen == {torch.float32}
    stages = outcome.stages
    assert stages["reconstructed"]["params"] < stages["teacher"]["params"]
    assert stages["pruned"]["nonzeros"] < stages["finetuned"]["nonzeros"]
    assert stages["quantized"]["export_max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_distill_run_on_an_hf_directory_and_npz_of_ids(bert_dir, tmp_path):
    teacher_dir, npz = bert_dir
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [*HF_TINY, f"teacher.source=hf:{teacher_dir}", f"data.source=npz:{npz}"]
    sets += ["register.model_name=hf-bert"]
    args = [a for s in sets for a in ("--set", s)]
    proc = fresh_process(
        ROOT, "run", str(ROOT / "configs" / "digits.yaml"), *args, "--json", store=uri, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)["metrics"]
    assert metrics["teacher/accuracy"] == 1.0 and metrics["final/accuracy"] > 0.5
    # the registered model serves the user's int64 ids [N, T] as they are, in a process where
    # neither transformers, torch nor distill can be imported
    serve = (
        BLOCK_IMPORTS
        + "import mlflow, numpy as np\n"
        + "X = np.load(sys.argv[2])['X_test']\n"
        + "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        + "assert [(s.type, s.shape) for s in m.metadata.get_input_schema().inputs] == [\n"
        + "    (np.dtype('int64'), (-1, -1))]\n"
        + "out = m.predict(X)['prediction'].astype(int).tolist()\n"
        + NOTHING_BLOCKED_LOADED
        + "print(out)\n"
    )
    served = subprocess.run(
        [sys.executable, "-I", "-c", serve, "models:/hf-bert@challenger", str(npz)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri},
    )
    assert served.returncode == 0, served.stderr[-3000:]
    predictions = np.array(json.loads(served.stdout.strip().splitlines()[-1]))
    accuracy = float((predictions == np.load(npz)["y_test"]).mean())
    assert accuracy == pytest.approx(metrics["final/accuracy"], abs=1e-9)


def test_a_users_module_answering_a_model_output_trains_and_loads(tmp_path, bert_dir):
    """A user's own module (not a save_pretrained directory) that answers with a transformers
    `ModelOutput` and takes int64 token ids: trained by distill, its logits are what counts."""
    (tmp_path / "own_text.py").write_text(
        "import torch\nfrom torch import nn\n"
        "from transformers.modeling_outputs import SequenceClassifierOutput\n\n\n"
        "class Bag(nn.Module):\n"
        "    def __init__(self, vocab=100, n_classes=3):\n"
        "        super().__init__()\n"
        "        self.embed = nn.EmbeddingBag(vocab, 16)\n"
        "        self.head = nn.Linear(16, n_classes)\n\n"
        "    def forward(self, ids):\n"
        "        assert ids.dtype == torch.int64\n"
        "        return SequenceClassifierOutput(logits=self.head(self.embed(ids)))\n"
    )
    data = _data(bert_dir[1], source="train", standardize=False)
    cfg = TeacherConfig(arch="own_text:Bag", epochs=2)
    model = load_teacher(cfg, data, seed=0, config_dir=tmp_path)
    assert type(model[-1]).__name__ == "Logits"
    assert model(torch.from_numpy(data.X_test)).shape == (len(data.X_test), 3)


# --- a text column and data.tokenizer -------------------------------------------------------


def _tokenizer_dir(path: Path) -> Path:
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, VOCAB)]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(path)
    return path


def test_a_text_column_is_tokenized_once_into_int64_ids(tmp_path, monkeypatch):
    import pandas as pd
    from transformers import AutoTokenizer

    import distill.tasks.compress.tokens as tokens

    monkeypatch.setenv("DISTILL_DATA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    texts = [
        " ".join(f"w{i}" for i in rng.integers(5, VOCAB, rng.integers(2, 9))) for _ in range(90)
    ]
    pd.DataFrame({"review": texts, "label": np.resize([0, 1, 2], 90)}).to_csv(
        tmp_path / "t.csv", index=False
    )
    tokenizer = _tokenizer_dir(tmp_path / "tok")
    data_cfg = {"source": f"csv:{tmp_path / 't.csv'}", "label": "label"}
    data_cfg["tokenizer"] = f"hf:{tokenizer}"

    def load(seed, **more):
        cfg = build_config({"data": data_cfg | more}, ["teacher.source=train"])
        assert cfg.data.standardize is False  # token ids are never scaled, whoever trains
        return load_dataset(cfg.data, seed)

    data = load(0)
    encoded = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)(
        texts, padding="longest"
    )
    expected = [
        (tuple(i), tuple(m))
        for i, m in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    rows = np.concatenate([data.X_train, data.X_val, data.X_test])
    assert rows.dtype == np.int64 and rows.shape == (90, 10)  # [CLS] + 8 words + [SEP]
    # the tokenizer's attention mask travels folded into the ids (tasks/compress/masks.py)
    assert data.masked
    ids, mask = unfold(rows)
    got = [(tuple(i), tuple(m)) for i, m in zip(ids.tolist(), mask.tolist(), strict=True)]
    assert sorted(got) == sorted(expected)
    assert data.feature_names == [f"t{i}" for i in range(10)] and data.input_shape == (10,)

    # the second load reads the ids back: the tokenizer is not loaded again
    monkeypatch.setattr(tokens, "load_tokenizer", lambda source: pytest.fail("tokenized twice"))
    again = load(1)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1
    assert again.digest == data.digest
    monkeypatch.undo()
    monkeypatch.setenv("DISTILL_DATA_CACHE", str(tmp_path / "cache"))
    assert load(0, max_length=4).X_train.shape[1] == 4  # truncated: [CLS] 2 words [SEP]
