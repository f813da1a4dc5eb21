"""Hidden size through the residual stream (tasks/compress/hidden.py) on tiny models built from
configs (no hub): at full width the rotation gives the teacher's logits (GPT-2, ViT, a timm-style
net); the slice keeps the principal directions of what the norms read (its loss is the discarded
eigenvalues, less than any other subspace's); the parameter count after a cut is the predicted one;
a ViT student round-trips through save_pretrained, GPT-2's config cannot say it; post-LN BERT keeps
channels (what least squares cannot recover from them is what the basis says is lost); the re-fit
solves its normal equations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import AutoModelForImageClassification

from distill.tasks.compress import hidden as hd
from distill.tasks.compress import transformer as tr
from tests.compress.test_transformer import (
    TimmBlock,
    TimmNet,
    _bert,
    _gpt2,
    _ids,
    _images,
    _tokens,
    _vit,
)


class TimmNormNet(nn.Module):
    """timm's VisionTransformer in small: patch embedding of `[N, T, 8]` rows plus a position
    parameter, timm blocks, a final norm, mean over tokens, a head."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 32)
        self.pos_embed = nn.Parameter(torch.randn(1, 6, 32) * 0.5)
        self.blocks = nn.Sequential(*[TimmBlock() for _ in range(depth)])
        self.norm = nn.LayerNorm(32)
        with torch.no_grad():  # a norm that is not the identity, so folding it is tested
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_(0, 0.3)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x) + self.pos_embed)
        return self.head(self.norm(x).mean(1))


def _gpt2_shaped() -> nn.Module:
    model = _gpt2()
    with torch.no_grad():  # GPT-2's init leaves g=1, β=0: make the fold matter
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return model


MODELS = {
    "gpt2": (_gpt2_shaped, _ids),
    "vit": (_vit, _images),
    "timm": (TimmNormNet, _tokens),
}


def _out(model: nn.Module, X: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return tr._output(model, torch.from_numpy(X))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_full_width_rotation_gives_the_teachers_logits(name):
    build, rows = MODELS[name]
    teacher, X = build(), rows()
    stream = hd.find_stream(teacher, X)
    assert isinstance(stream, hd.Stream), stream
    student = copy.deepcopy(teacher)
    hd.slice_hidden(student, stream, hd.stream_basis(student, stream, X), stream.width)
    assert torch.allclose(_out(student, X), _out(teacher, X), atol=1e-5, rtol=0)
    # rotated, not left alone: the first writer's weights moved
    e = stream.embeddings[0]
    before = tr.weight_of(teacher.get_submodule(e))
    moved = tr.weight_of(student.get_submodule(e)) - before
    assert moved.abs().max() > 0.5 * before.abs().max()
    assert hd.refusal(teacher, X) == ""


def test_gpt2_stream_has_tied_head_and_both_embeddings():
    stream = hd.find_stream(_gpt2(), _ids())
    assert isinstance(stream, hd.Stream)
    assert stream.embeddings == ("transformer.wte", "transformer.wpe")
    assert stream.norms[-1] == hd.Norm("transformer.ln_f", ("lm_head",))
    assert stream.tied == (("lm_head", "transformer.wte"),)
    assert len(stream.norms) == 5 and len(stream.writers) == 4


@pytest.mark.parametrize("name", list(MODELS))
def test_the_slice_loses_the_discarded_eigenvalues_and_no_subspace_loses_less(name):
    build, rows = MODELS[name]
    teacher, X = build(), rows()
    stream = hd.find_stream(teacher, X)
    assert isinstance(stream, hd.Stream)
    basis = hd.stream_basis(teacher, stream, X)
    R = hd.stream_rows(teacher, stream, torch.from_numpy(X)).numpy()
    assert np.allclose(R.sum(1), 0) and basis.rows == len(R)
    total = (R**2).sum()
    rng = np.random.default_rng(1)
    for k in (24, 16, 8):
        V = basis.vectors[:, : k - 1]
        lost = ((R - R @ V @ V.T) ** 2).sum()
        assert lost == pytest.approx(basis.values[k - 1 :].sum(), rel=1e-6)
        assert 0 < lost < total
        # any other (k-1)-dim subspace of the centred vectors loses more
        other = np.linalg.qr(hd._ones_complement(32) @ rng.normal(size=(31, k - 1)))[0]
        assert ((R - R @ other @ other.T) ** 2).sum() > lost


def test_the_students_stream_is_the_rotated_teachers():
    """What the student's first norm reads is `Mᵀ C x` of what the teacher's reads: embeddings
    and position parameters are rotated and centred."""
    teacher, X = TimmNormNet(), _tokens()
    stream = hd.find_stream(teacher, X)
    assert isinstance(stream, hd.Stream) and stream.params == ("pos_embed",)
    basis = hd.stream_basis(teacher, stream, X)
    student = copy.deepcopy(teacher)
    hd.slice_hidden(student, stream, basis, 12)
    ln = stream.norms[0].path
    x = torch.from_numpy(X)
    t = tr.taps(teacher, x, inputs=(ln,))[("in", ln)].double()
    s = tr.taps(student, x, inputs=(ln,))[("in", ln)].double()
    M = torch.from_numpy(hd.rotation(basis, 12))
    assert s.shape[-1] == 12
    assert torch.allclose(s, (t - t.mean(-1, keepdim=True)) @ M, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_cut_runs_and_removes_the_predicted_parameters(name):
    build, rows = MODELS[name]
    teacher, X = build(), rows()
    stream = hd.find_stream(teacher, X)
    assert isinstance(stream, hd.Stream)
    basis = hd.stream_basis(teacher, stream, X)
    counts = []
    for k in (32, 24, 12):
        student = copy.deepcopy(teacher)
        predicted = hd.params_after(student, stream, k)
        hd.slice_hidden(student, stream, basis, k)
        assert _params(student) == predicted
        assert _out(student, X).shape == _out(teacher, X).shape
        counts.append(_params(student))
    assert counts[0] > counts[1] > counts[2]
    # untying GPT-2's head adds its own weight: vocab x k
    extra = 100 * 32 if name == "gpt2" else 0
    assert counts[0] == _params(teacher) + extra


def test_vit_student_round_trips_through_save_pretrained(tmp_path):
    teacher, X = _vit(), _images()
    student = copy.deepcopy(teacher)
    report = hd.narrow_hidden(student, teacher, 20, X)
    assert report.config is not None and report.config["hidden_size"] == 20
    assert tr.config_mismatch(student) == ""
    student.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.hidden_size == 20
    assert _params(loaded) == _params(student) < _params(teacher)
    assert torch.allclose(_out(loaded, X), _out(student, X), atol=1e-6)


def test_gpt2_student_runs_untied_but_its_config_cannot_say_it():
    teacher, X = _gpt2(), _ids()
    student = copy.deepcopy(teacher)
    hd.narrow_hidden(student, teacher, 16, X)
    assert student.lm_head.weight is not student.transformer.wte.weight
    assert student.config.tie_word_embeddings is False
    assert "lm_head.weight" not in student.all_tied_weights_keys  # nothing ties it back
    assert student.config.n_embd == 16
    assert "c_attn" in tr.config_mismatch(student)  # GPT-2's attention width is n_embd
    assert torch.isfinite(_out(student, X)).all()


def test_a_head_without_norm_before_it_is_refused_in_one_line():
    why = hd.refusal(TimmNet(), _tokens())
    assert why == (
        "hidden size: head (Linear) reads the residual stream without a LayerNorm before it"
    )


def test_a_post_ln_bert_stream_is_found_with_the_pooler_as_its_last_reader():
    stream = hd.find_stream(_bert(), _ids())
    assert isinstance(stream, hd.Stream) and stream.post_ln, stream
    assert len(stream.embeddings) == 3 and len(stream.writers) == 4 and len(stream.norms) == 5
    first, last = stream.norms[0], stream.norms[-1]
    assert first.path == "bert.embeddings.LayerNorm"
    assert first.readers == tuple(
        f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")
    )
    assert stream.norms[1].readers == ("bert.encoder.layer.0.intermediate.dense",)
    # the classifier reads the pooler's tanh, also 32 wide, not the stream
    assert last == hd.Norm("bert.encoder.layer.1.output.LayerNorm", ("bert.pooler.dense",))
    assert hd.refusal(_bert(), _ids()) == ""


def _norm_outputs(model: nn.Module, stream: hd.Stream, X: np.ndarray) -> np.ndarray:
    paths = tuple(n.path for n in stream.norms)
    got = tr.taps(model, torch.from_numpy(X), outputs=paths)
    return np.concatenate(
        [got[("out", p)].reshape(-1, stream.width).double().numpy() for p in paths]
    )


def test_a_post_ln_channel_basis_discards_what_least_squares_cannot_recover():
    """The values are the variance each picked channel adds: they sum to the total, and the share
    left by the first k is what the best linear map from those k channels (with a bias) misses
    of every channel, on the same rows."""
    teacher, X = _bert(), _ids()
    stream = hd.find_stream(teacher, X)
    assert isinstance(stream, hd.Stream)
    basis = hd.stream_basis(teacher, stream, X)
    A = _norm_outputs(teacher, stream, X)
    A = A - A.mean(0)
    assert basis.selection and basis.rows == len(A)
    assert np.isclose(basis.values.sum(), (A**2).sum() / len(A), rtol=1e-8)
    for k in (4, 12, 24):
        kept = hd.rotation(basis, k).argmax(0)
        assert sorted(kept) == list(kept) and len(set(kept)) == k
        fit, *_ = np.linalg.lstsq(A[:, kept], A, rcond=None)
        missed = ((A - A[:, kept] @ fit) ** 2).sum() / (A**2).sum()
        assert np.isclose(basis.discarded(k), missed, rtol=1e-6, atol=1e-9), k
    assert basis.discarded(stream.width) == 0.0


def test_a_post_ln_cut_keeps_channels_and_the_refit_lowers_the_error():
    """At full width the student is the teacher; below, the embeddings' norm reads the teacher's
    own values on the kept channels (writers sliced, not mixed) and the re-fit solves the
    pooler's normal equations and lowers the output error."""
    teacher, X = _bert(), _ids()
    whole = copy.deepcopy(teacher)
    hd.narrow_hidden(whole, teacher, 32, X, refit=False)
    assert torch.allclose(_out(whole, X), _out(teacher, X), atol=1e-5, rtol=0)
    plain, fitted = copy.deepcopy(teacher), copy.deepcopy(teacher)
    hd.narrow_hidden(plain, teacher, 16, X, refit=False)
    report = hd.narrow_hidden(fitted, teacher, 16, X, refit=True, ridge=0.0)
    assert _params(fitted) == hd.params_after(teacher, hd.find_stream(teacher, X), 16)
    stream = hd.find_stream(teacher, X)
    assert isinstance(stream, hd.Stream)
    kept = hd.rotation(hd.stream_basis(teacher, stream, X), 16).argmax(0)
    norm, x = "bert.embeddings.LayerNorm", torch.from_numpy(X)
    want = tr.taps(teacher, x, inputs=(norm,))[("in", norm)][..., kept]
    assert torch.equal(tr.taps(plain, x, inputs=(norm,))[("in", norm)], want)
    assert report.refitted is not None and report.refitted[-1] == "bert.pooler.dense"
    reader = "bert.pooler.dense"
    A = tr.taps(fitted, x, inputs=(reader,))[("in", reader)].double()
    Z = tr.taps(teacher, x, outputs=(reader,))[("out", reader)].double()
    E = tr.taps(fitted, x, outputs=(reader,))[("out", reader)].double() - Z
    A1 = torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], 1)
    assert (A1.T @ E).abs().max() < 1e-4 * (A1.T @ Z).abs().max()
    Z = _out(teacher, X).double()
    assert (_out(fitted, X).double() - Z).pow(2).mean() < 0.5 * (_out(plain, X).double() - Z).pow(
        2
    ).mean()


def test_the_refit_solves_the_head_normal_equations_and_lowers_the_error():
    teacher, X = _vit(), _images()
    plain, fitted = copy.deepcopy(teacher), copy.deepcopy(teacher)
    hd.narrow_hidden(plain, teacher, 12, X, refit=False)
    report = hd.narrow_hidden(fitted, teacher, 12, X, refit=True, ridge=0.0)
    assert report.refitted is not None and report.refitted[-1] == "classifier"
    x = torch.from_numpy(X)
    A = tr.taps(fitted, x, inputs=("classifier",))[("in", "classifier")].double()
    Z = _out(teacher, X).double()
    E = _out(fitted, X).double() - Z
    A1 = torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], 1)
    assert (A1.T @ E).abs().max() < 1e-4 * (A1.T @ Z).abs().max()
    assert E.pow(2).mean() < (_out(plain, X).double() - Z).pow(2).mean()


def test_the_hidden_group_says_what_can_be_cut_and_saved():
    vit = hd.hidden_group(_vit(), _images())
    assert (vit.kind, vit.width, vit.reducible, vit.unsaved) == ("hidden", 32, True, "")
    gpt2 = hd.hidden_group(_gpt2(), _ids())
    assert gpt2.reducible and "c_attn" in gpt2.unsaved
    bert = hd.hidden_group(_bert(), _ids())  # BERT's head size is hidden_size / heads
    assert bert.reducible and "attention.self.query" in bert.unsaved


def test_hidden_after_heads_and_ffn_cuts_round_trips(tmp_path):
    """transformer.narrow first (heads, FFN), then the hidden size re-fitted to that student: a
    ViT config expresses all three."""
    teacher, X = _vit(), _images()
    groups = {g.kind: g for g in tr.transformer_groups(teacher, X) if g.reducible}
    student = tr.narrow(
        copy.deepcopy(teacher), teacher, {groups["heads"].name: 3, groups["ffn"].name: 40}, X
    )
    reference = copy.deepcopy(student)
    hd.narrow_hidden(student, reference, 20, X)
    assert tr.config_mismatch(student) == ""
    student.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert (loaded.config.hidden_size, loaded.config.num_attention_heads) == (20, 3)
    assert loaded.config.intermediate_size == 40
    assert torch.allclose(_out(loaded, X), _out(student, X), atol=1e-6)


def test_a_sliced_norm_reads_the_projected_stream_as_the_teachers_would():
    """Below full width the first block's q/k/v compute what the teacher's compute on the stream
    projected onto the kept directions: the norm's scale sqrt(D/k) and eps x D/k are what make a
    width-k norm divide as the teacher's width-D one (a large eps shows a wrong one)."""
    teacher, X = TimmNormNet(), _tokens()
    for m in teacher.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 0.5
    stream = hd.find_stream(teacher, X)
    assert isinstance(stream, hd.Stream)
    basis = hd.stream_basis(teacher, stream, X)
    student = copy.deepcopy(teacher)
    hd.slice_hidden(student, stream, basis, 10)
    norm, (reader,) = stream.norms[0].path, stream.norms[0].readers
    x = torch.from_numpy(X)
    t = tr.taps(teacher, x, inputs=(norm,))[("in", norm)].double()
    P = torch.from_numpy(basis.vectors[:, :9] @ basis.vectors[:, :9].T)
    projected = ((t - t.mean(-1, keepdim=True)) @ P).float()
    with torch.no_grad():
        want = teacher.get_submodule(reader)(teacher.get_submodule(norm)(projected))
    got = tr.taps(student, x, outputs=(reader,))[("out", reader)]
    assert torch.allclose(got, want, atol=1e-5)
