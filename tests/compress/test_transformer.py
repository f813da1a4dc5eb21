"""The transformer engine (tasks/compress/transformer.py) on tiny models built from configs (no
hub): blocks found on BERT, ViT, GPT-2 (`Conv1D`) and a timm-style block (fused `qkv`); at full
width a cut and re-fit gives the teacher's logits; cuts update module attributes, config and
layer indices; the re-fitted output projection is the least-squares optimum; a hand-written
attention no adapter knows is refused with a reason, never cut."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

from distill.tasks.compress import transformer as tr
from tests.tokens import tiny_bert
from tests.zoo import HeadsAttentionNet

VOCAB, T = 100, 12


def _bert(layers: int = 2, heads: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return tiny_bert(
        layers=layers, vocab_size=VOCAB, num_attention_heads=heads, max_position_embeddings=32
    )


def _vit(layers: int = 2, heads: int = 4) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def _gpt2(layers: int = 2, heads: int = 4, **extra) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=heads, n_positions=32, **extra
    )
    return GPT2LMHeadModel(config).eval()


class TimmAttention(nn.Module):
    """timm's `Attention`: one fused qkv Linear, `num_heads` / `head_dim` read at forward time."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TimmAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmNet(nn.Module):
    """Patch embedding of `[N, T, 8]` rows, timm blocks, mean over tokens, a head."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.Sequential(*[TimmBlock() for _ in range(depth)])
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def _ids(n: int = 96) -> np.ndarray:
    return np.random.default_rng(0).integers(1, VOCAB, size=(n, T), dtype=np.int64)


def _images(n: int = 96) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 1, 8, 8)).astype(np.float32)


def _tokens(n: int = 96) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 6, 8)).astype(np.float32)


MODELS = {
    "bert": (_bert, _ids),
    "vit": (_vit, _images),
    "gpt2": (_gpt2, _ids),
    "timm": (TimmNet, _tokens),
}


def _out(model: nn.Module, X: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return tr._output(model, torch.from_numpy(X))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- discovery ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layout", "stack", "ffn"),
    [
        ("bert", "bert", "bert.encoder.layer", "intermediate.dense"),
        ("vit", "qkvo", "vit.layers", "mlp.fc1"),
        ("gpt2", "gpt2", "transformer.h", "mlp.c_fc"),
        ("timm", "timm", "blocks", "mlp.fc1"),
    ],
)
def test_blocks_are_found_with_heads_and_feed_forward(name, layout, stack, ffn):
    build, rows = MODELS[name]
    model = build()
    found = tr.find(model)
    assert found.refused == []
    assert [b.path for b in found.blocks] == [f"{stack}.0", f"{stack}.1"]
    for b in found.blocks:
        assert [(a.layout, a.heads, a.head_dim) for a in b.attention] == [(layout, 4, 8)]
        assert b.ffn is not None and b.ffn.writers == (ffn,)
    groups = {g.name: g for g in tr.transformer_groups(model, rows())}
    kinds = sorted(g.kind for g in groups.values())
    if name == "timm":  # no config: one heads and one ffn group per layer
        assert kinds == ["depth", "ffn", "ffn", "heads", "heads"]
        assert not any(g.uniform for g in groups.values())
    else:  # a config: one width per stack
        assert kinds == ["depth", "ffn", "heads"]
        assert groups[stack].recipe[0] == ("num_hidden_layers", "layers")
    assert all(g.reducible for g in groups.values()), {g.name: g.why_not for g in groups.values()}
    assert sorted(groups[stack].order) == [0, 1]


def test_bert_and_gpt2_head_cuts_are_made_but_their_configs_cannot_say_so():
    for build in (_bert, _gpt2):
        heads = next(g for g in tr.transformer_groups(build(), _ids()) if g.kind == "heads")
        assert heads.reducible and "derived from hidden_size" in heads.unsaved, heads
    vit_heads = next(g for g in tr.transformer_groups(_vit(), _images()) if g.kind == "heads")
    assert vit_heads.unsaved == "" and dict(vit_heads.recipe)["head_dim"] == "head_dim"


def test_attention_written_by_hand_is_refused_with_a_reason_never_cut():
    model = HeadsAttentionNet()
    found = tr.find(model)
    assert found.blocks == []
    assert [(p, c) for p, c, _ in found.refused] == [("attn", "HeadsAttention")]
    assert "no known layout" in found.refused[0][2]
    assert not tr.holds_blocks(model) and tr.transformer_groups(model) == []
    line = tr.describe(tr.unsupported(model))
    assert line.startswith("attn (HeadsAttention): attention-like module of no known layout")
    before = copy.deepcopy(model.state_dict())
    assert tr.cut(model, {"attn": 2}) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_block_whose_forward_fixes_its_width_fails_the_probe():
    class Fixed(TimmAttention):  # timm's original: reshape(B, N, C) with C the input's width
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            return self.proj(out.transpose(1, 2).reshape(B, N, C))

    model = TimmNet()
    for block in model.blocks:
        fixed = Fixed(32, 4)
        fixed.load_state_dict(block.attn.state_dict())
        block.attn = fixed
    heads = [g for g in tr.transformer_groups(model, _tokens()) if g.kind == "heads"]
    assert heads and all("its forward fails after a cut" in g.why_not for g in heads)
    assert [g.reducible for g in tr.transformer_groups(model, _tokens()) if g.kind == "ffn"] == [
        True,
        True,
    ]


# --- full width: the teacher, exactly -----------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_at_full_width_cut_and_refit_give_the_teachers_logits(name):
    build, rows = MODELS[name]
    teacher, X = build(), rows()
    groups = tr.transformer_groups(teacher, X)
    full = {g.name: g.width for g in groups}
    report = tr.NarrowReport()
    student = tr.narrow(
        copy.deepcopy(teacher), teacher, full, X, ridge=0.0, refit="all", report=report
    )
    assert len(report.refitted) == 4  # every output projection and down projection re-fitted
    assert torch.allclose(_out(student, X), _out(teacher, X), atol=1e-4)
    shapes = tr.copy.deepcopy(teacher)
    tr.cut(shapes, full)
    assert torch.equal(_out(shapes, X), _out(teacher, X))


# --- cuts ---------------------------------------------------------------------------------------


def test_cutting_heads_updates_attributes_and_config_and_forward_runs():
    X = _ids()
    bert = _bert()
    groups = tr.transformer_groups(bert, X)
    heads = next(g for g in groups if g.kind == "heads")
    kept = tr.cut(bert, {heads.name: 2}, X, "l2", groups)
    assert sorted(kept) == [f"bert.encoder.layer.{i}.attention" for i in (0, 1)]
    for layer in bert.bert.encoder.layer:
        s = layer.attention.self
        assert (s.num_attention_heads, s.attention_head_size, s.all_head_size) == (2, 8, 16)
        assert s.query.weight.shape == (16, 32) and layer.attention.output.dense.weight.shape == (
            32,
            16,
        )
    assert _out(bert, X).shape == (len(X), 3)
    assert "attention.self.query.weight" in tr.config_mismatch(bert)  # BERT: not expressible

    vit, images = _vit(), _images()
    groups = tr.transformer_groups(vit, images)
    widths = {g.name: g.width // 2 for g in groups if g.kind in ("heads", "ffn")}
    tr.cut(vit, widths, images, "activation", groups)
    assert (vit.config.num_attention_heads, vit.config.head_dim) == (2, 8)
    assert vit.config.intermediate_size == 32
    attention = vit.vit.layers[0].attention
    assert attention.num_attention_heads == 2 and attention.q_proj.out_features == 16
    assert tr.config_mismatch(vit) == ""


def test_a_cut_vit_survives_save_pretrained_and_from_pretrained(tmp_path):
    teacher, X = _vit(), _images()
    groups = tr.transformer_groups(teacher, X)
    widths = {g.name: max(1, g.width // 2) for g in groups}
    student = tr.narrow(copy.deepcopy(teacher), teacher, widths, X)
    assert student.config.num_hidden_layers == 1 and len(student.vit.layers) == 1
    student.save_pretrained(tmp_path / "s")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "s").eval()
    assert type(loaded) is type(student)
    assert torch.allclose(_out(loaded, X), _out(student, X), atol=1e-5)
    assert _params(student) < _params(teacher) / 2


def test_the_refitted_output_projection_is_the_least_squares_optimum():
    teacher, X = _bert(), _ids()
    heads = next(g for g in tr.transformer_groups(teacher, X) if g.kind == "heads")
    student = tr.narrow(copy.deepcopy(teacher), teacher, {heads.name: 2}, X, ridge=0.0, refit="cut")
    reader = "bert.encoder.layer.1.attention.output.dense"  # its inputs: what the student computes
    a = tr.taps(student, torch.from_numpy(X), inputs=(reader,))[("in", reader)]
    z = tr.taps(teacher, torch.from_numpy(X), outputs=(reader,))[("out", reader)]
    A = np.c_[a.reshape(-1, 16).double().numpy(), np.ones(a.shape[0] * a.shape[1])]
    solution = np.linalg.lstsq(A, z.reshape(-1, 32).double().numpy(), rcond=None)[0]
    dense = student.get_submodule(reader)
    assert np.allclose(dense.weight.detach().numpy(), solution[:16].T, atol=1e-4)
    assert np.allclose(dense.bias.detach().numpy(), solution[16], atol=1e-4)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_the_teachers_taps_kept_give_the_same_student_in_one_pass_a_batch(name):
    """`narrow` re-fits every reader to the teacher's taps: kept (`FixedTaps`) they are one
    teacher pass per batch, shared by a second narrowing on the same rows, and the student is
    the one the taps run per reader give (a depth cut too: the kept layer absorbs the dropped
    one), exactly."""
    make, rows = MODELS[name]
    teacher, X = make(layers=3), rows()
    groups = tr.transformer_groups(teacher, X)
    widths = {g.name: g.width - 1 if g.kind == "depth" else g.width // 2 for g in groups}
    copies = [copy.deepcopy(teacher) for _ in range(3)]
    passes: list[int] = []
    teacher.register_forward_pre_hook(lambda *_: passes.append(1))
    per_reader = tr.teacher_taps(teacher, X, 32)
    per_reader.max_bytes = 0  # nothing kept: every request runs the teacher
    want = tr.narrow(copies[0], teacher, widths, X, batch_size=32, fixed=per_reader)
    assert per_reader.kept == {}
    batches, run_per_reader = -(-len(X) // 32), len(passes)
    kept = tr.teacher_taps(teacher, X, 32)
    passes.clear()
    got = tr.narrow(copies[1], teacher, widths, X, batch_size=32, fixed=kept)
    again = tr.narrow(copies[2], teacher, widths, X, batch_size=32, fixed=kept)
    assert sorted(kept.kept) == list(range(batches)) and kept.held > 0
    assert len(passes) == batches and run_per_reader >= 4 * batches, (passes, run_per_reader)
    for student in (got, again):
        for key, value in want.state_dict().items():
            assert torch.equal(student.state_dict()[key], value), key


def test_taps_are_what_a_module_gave_not_what_a_later_in_place_op_made_of_it():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h += 1.0  # in place, after `a` returned it
            return self.b(h)

    model, x = InPlace(), torch.randn(3, 4)
    got = tr.taps(model, x, inputs=("b",), outputs=("a",))
    assert torch.allclose(got["out", "a"], model.a(x))
    assert torch.allclose(got["in", "b"], got["out", "a"] + 1)


def test_dropping_layers_renumbers_them_and_the_config(tmp_path):
    teacher, X = _gpt2(layers=3, scale_attn_by_inverse_layer_idx=True), _ids()
    student = copy.deepcopy(teacher)
    tr.drop_layers(student, "transformer.h", [0, 2])
    assert [b.attn.layer_idx for b in student.transformer.h] == [0, 1]
    assert student.transformer.h[1]._distill_origin == 2
    depth = next(g for g in tr.transformer_groups(teacher) if g.kind == "depth")
    assert tr.sync_config(student, [depth]) == {"num_hidden_layers": 2}
    assert student.config.n_layer == 2
    # the inverse-layer scaling of the moved layer is folded into its queries: the same logits as
    # the model with layer 1 skipped, and from_pretrained agrees
    skipped = copy.deepcopy(teacher)
    handle = tr._skip(skipped.transformer.h[1])
    assert torch.allclose(_out(student, X), _out(skipped, X), atol=1e-5)
    handle.remove()
    student.save_pretrained(tmp_path / "s")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert torch.allclose(_out(loaded, X), _out(student, X), atol=1e-5)


def test_bert_depth_cut_renumbers_and_refits():
    teacher, X = _bert(layers=3), _ids()
    depth = next(g for g in tr.transformer_groups(teacher, X) if g.kind == "depth")
    report = tr.NarrowReport()
    student = tr.narrow(copy.deepcopy(teacher), teacher, {depth.name: 2}, X, report=report)
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert report.config == {"num_hidden_layers": 2}
    assert len(report.kept[depth.name]) == 2
    assert _out(student, X).shape == (len(X), 3)


def test_a_cut_to_a_parameter_count_fills_what_coarse_heads_leave():
    # 4 heads of 8 dims and 64 feed-forward units a layer: a head (in both layers) is 2,096 of
    # the 22,595 parameters, a unit 130; a common fraction alone moves by whole heads' steps
    teacher, X = _bert(layers=2, heads=4), _ids()
    width = [g for g in tr.transformer_groups(teacher, X) if g.reducible and g.kind != "depth"]
    cost = tr.cost_model(teacher, width)
    original = {g.name: g.width for g in width}
    unit = {g.name: cost.params() - cost.params({g.name: g.width - 1}) for g in width}
    for share in (0.9, 0.7, 0.5, 0.4):  # one unit each: 36 %
        ask = int(share * cost.params())
        widths = tr.fraction_widths(cost, width, original, {}, ask)
        assert widths is not None and cost.params(widths) <= ask
        # no group takes one more unit within the ask: the count is filled to a unit's worth
        assert all(
            widths[g.name] == g.width or cost.params(widths | {g.name: widths[g.name] + 1}) > ask
            for g in width
        )
        assert ask - cost.params(widths) < max(unit.values())
    # and a structured cut of the model to that count lands there, its forward intact
    student = copy.deepcopy(teacher)
    ask = int(0.6 * cost.params())
    cuts = tr.prune_to_fraction(student, 1.0, "activation", X, original, ask)
    assert cuts and _params(student) == cuts[0].params <= ask
    assert ask - _params(student) < max(unit.values())
    assert torch.isfinite(_out(student, X)).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_half_width_students_run_and_are_smaller(name):
    build, rows = MODELS[name]
    teacher, X = build(), rows()
    groups = tr.transformer_groups(teacher, X)
    widths = {g.name: max(1, g.width // 2) for g in groups}
    student = tr.narrow(copy.deepcopy(teacher), teacher, widths, X)
    cost = tr.cost_model(teacher, groups)
    assert cost.params() == _params(teacher)
    assert cost.params(widths) == _params(student) < _params(teacher)
    out = _out(student, X)
    assert out.shape == _out(teacher, X).shape and torch.isfinite(out).all()


# --- the pipeline: width reconstruction and structured pruning on Hugging Face teachers ----------

PIPELINE = [
    "reconstruct.mode=width",
    "compress.prune.method=structured",
    "reduce.budget.ratio=1.5",
    "reduce.calibration_samples=64",
    "finetune.epochs=1",
    "finetune.batch_size=32",
    "compress.prune.recovery_epochs=1",
    "evaluate.latency_repeats=3",
    "evaluate.large_batch=32",
    "evaluate.plots=false",
    "target=null",
]


def _teacher_dir(root, model, X: np.ndarray) -> tuple:
    """`model` saved with save_pretrained, and an npz of rows it labelled (its own answers)."""
    from distill.tasks.compress.hf import HFLogits

    task = "images" if X.dtype == np.float32 else "sequence classification"
    wrapped, x = HFLogits(model, task), torch.from_numpy(X)
    with torch.no_grad():
        head = getattr(model, "classifier", None)
        if head is not None:  # its bias centred on these rows: every class among the answers
            head.bias -= wrapped(x).mean(0)
        y = wrapped(x).argmax(1).numpy()
    model.save_pretrained(root / "teacher")
    k = int(0.75 * len(X))
    npz = root / "rows.npz"
    np.savez(npz, X_train=X[:k], y_train=y[:k], X_test=X[k:], y_test=y[k:])
    return root / "teacher", npz


def _compress(teacher_dir, npz, *more: str):
    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.pipeline import compress
    from distill.tasks.platform.config import build_config

    sets = [*PIPELINE, f"teacher.source=hf:{teacher_dir}", f"data.source=npz:{npz}", *more]
    cfg = build_config({}, sets)
    return compress(cfg, load_dataset(cfg.data, cfg.seed))


@pytest.mark.parametrize("name", ["vit", "gpt2"])
def test_width_and_structured_pruning_run_on_hf_teachers(name, tmp_path):
    from transformers import GPT2ForSequenceClassification

    if name == "vit":
        model, X = _vit(), _images(240)
    else:
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=3
        )
        config.pad_token_id = 0
        model, X = GPT2ForSequenceClassification(config).eval(), _ids(240)
    outcome = _compress(*_teacher_dir(tmp_path, model, X))
    stages = outcome.stages
    assert stages["reconstructed"]["params"] < stages["teacher"]["params"]
    assert stages["pruned"]["params"] < stages["finetuned"]["params"]  # units removed, not zeroed
    assert 0 <= stages["quantized"]["accuracy"] <= 1
    assert outcome.reduction.mode == "width"
    assert any(layer.rank is not None for layer in outcome.reduction.layers)


def test_the_preflight_passes_for_hf_teachers_in_width_mode(tmp_path):
    from distill.tasks.compress.data import load_dataset
    from distill.tasks.compress.preflight import preflight
    from distill.tasks.compress.teacher import load_teacher
    from distill.tasks.platform.config import build_config

    for name, (build, rows) in {"bert": (_bert, _ids), "vit": (_vit, _images)}.items():
        (tmp_path / name).mkdir()
        teacher_dir, npz = _teacher_dir(tmp_path / name, build(), rows(40))
        sets = [*PIPELINE, f"teacher.source=hf:{teacher_dir}", f"data.source=npz:{npz}"]
        cfg = build_config({}, sets)
        data = load_dataset(cfg.data, cfg.seed)
        teacher = load_teacher(cfg.teacher, data, cfg.seed)
        result = preflight(teacher, data, cfg)
        assert result.student_params < result.teacher_params, name


def test_student_hf_is_written_where_the_config_can_say_it(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from distill.tasks.compress.hf import HFLogits, save_student

    teacher, X = _bert(), _ids()
    groups = {g.kind: g for g in tr.transformer_groups(teacher, X)}
    depth_ffn = {groups["depth"].name: 1, groups["ffn"].name: 32}
    student = tr.narrow(copy.deepcopy(teacher), teacher, depth_ffn, X)
    wrapped = HFLogits(student, "sequence classification")
    assert save_student(wrapped, tmp_path / "s") == ""
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s").eval()
    assert loaded.config.num_hidden_layers == 1 and loaded.config.intermediate_size == 32
    assert torch.allclose(_out(loaded, X), _out(student, X), atol=1e-5)
    # a BERT head cut: the config derives the head size from hidden_size; no directory
    tr.cut(student, {groups["heads"].name: 2}, X, "l2")
    why = save_student(wrapped, tmp_path / "heads")
    assert why.startswith("its BertConfig cannot describe the student (bert.encoder.layer.0")
    assert not (tmp_path / "heads").exists()


@pytest.mark.slow
def test_distill_run_narrows_and_prunes_an_hf_bert(tmp_path):
    """`distill run` with an hf: BERT, reconstruct.mode=width and structured pruning: exit 0, a
    smaller student, its accuracy reported, and student_hf/ (or the note why not) on the run."""
    import json

    import mlflow

    from tests.conftest import ROOT, fresh_process

    teacher_dir, npz = _teacher_dir(tmp_path, _bert(), _ids(320))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [*PIPELINE, f"teacher.source=hf:{teacher_dir}", f"data.source=npz:{npz}"]
    sets += ["register.model_name=hf-bert-width", "teacher.hf_loadable=true"]
    args = [a for s in sets for a in ("--set", s)]
    proc = fresh_process(
        ROOT, "run", str(ROOT / "configs" / "digits.yaml"), *args, "--json", store=uri, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout)
    metrics = run["metrics"]
    assert metrics["final/params"] < metrics["teacher/params"]
    assert metrics["reconstructed/params"] < metrics["teacher/params"]
    assert 0 <= metrics["final/accuracy"] <= 1 and metrics["teacher/accuracy"] == 1.0
    client = mlflow.MlflowClient(uri)
    # finetune.lr left out: the transformer recipe's, recorded on the parent run as it ran;
    # finetune.epochs as set
    params = client.get_run(run["run_id"]).data.params
    assert (params["finetune.lr"], params["finetune.epochs"]) == ("0.001", "1")
    assert (
        "finetune: lr 0.001 from the Hugging Face transformer recipe, 1 epoch and 1 recovery "
        "epoch a pruning round as set (set finetune.lr to choose)" in proc.stderr
    )
    names = {a.path for a in client.list_artifacts(run["run_id"])}
    # teacher.hf_loadable: the cuts are what the config says, so student_hf/ loads as it is
    assert "student_hf" in names, names
    from transformers import AutoModelForSequenceClassification

    local = client.download_artifacts(run["run_id"], "student_hf", str(tmp_path))
    loaded = AutoModelForSequenceClassification.from_pretrained(local)
    assert _params(loaded) == metrics["final/params"]
