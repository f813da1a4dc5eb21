"""The hidden size in the width plan (reduce.plan_hidden, hidden.HiddenCost, reconstruct's call):
the plan narrows a residual stream that is low-rank and keeps GPT-2's tied stream whole when
untying its head costs more than the cut saves; the bilinear cost is exact; the reconstructed
student has the predicted parameter count, exports to ONNX and round-trips through
save_pretrained; the pre-flight builds the cut on two rows."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import AutoModelForImageClassification, GPT2Config, GPT2LMHeadModel

from distill.tasks.compress import hidden as hd
from distill.tasks.compress import transformer as tr
from distill.tasks.compress.quantize import export_onnx
from distill.tasks.compress.reconstruct import reconstruct
from distill.tasks.compress.reduce import KEPT_BY_BUDGET, reduce_model
from distill.tasks.platform.config import BudgetConfig, ReconstructConfig, ReduceConfig
from tests.compress.test_transformer import TimmNet, _bert, _gpt2, _ids, _images, _tokens, _vit


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _out(model: nn.Module, X: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return tr._output(model, torch.from_numpy(X))


@torch.no_grad()
def _low_rank_stream(model: nn.Module, X: np.ndarray, r: int) -> nn.Module:
    """`model` (in place) with everything written to its residual stream projected onto one
    random r-dim subspace: what its norms read then has rank r (the stream is centred first)."""
    stream = hd.find_stream(model, X)
    assert isinstance(stream, hd.Stream), stream
    U, _ = torch.linalg.qr(torch.randn(stream.width, r, generator=torch.Generator().manual_seed(3)))
    P = U @ U.T
    for name in (*stream.embeddings, *stream.writers):
        m = model.get_submodule(name)
        if isinstance(m, nn.Embedding):
            m.weight.copy_(m.weight @ P)
            continue
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.tensordot(P, m.weight, dims=([1], [0])))
        else:
            b = None if m.bias is None else P @ m.bias
            tr._set_map(m, P @ tr.weight_of(m), b)
            continue
        if m.bias is not None:
            m.bias.copy_(P @ m.bias)
    for name in stream.params:
        p = model.get_parameter(name)
        p.copy_(p @ P)
    return model


def _width(budget: BudgetConfig) -> ReduceConfig:
    return ReduceConfig(budget=budget)


def _big_vocab_gpt2() -> GPT2LMHeadModel:
    """A GPT-2 whose tied table (5000 x 32) is most of it: untying costs 5000 x k."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=5000, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def test_the_plan_narrows_a_low_rank_stream_and_the_student_has_the_predicted_size():
    X = _images()
    teacher = _low_rank_stream(_vit(), X, 6)
    # half the parameters: the stream alone pays for it, heads, units and layers stay whole
    red = reduce_model(teacher, X, _width(BudgetConfig(ratio=2)), "width")
    assert [p.name for p in red.layers if p.rank is not None] == [hd.NAME]
    red = reduce_model(teacher, X, _width(BudgetConfig(ratio=4)), "width")
    plan = {p.name: p for p in red.layers}
    # 6 directions (+ the all-ones slot): a stream of 8 keeps all of what the norms read
    assert plan[hd.NAME].rank is not None and plan[hd.NAME].rank <= 8
    assert plan[hd.NAME].variance > 1 - 1e-6
    assert hd.NAME not in red.fixed
    student = reconstruct(teacher, red, X, ReconstructConfig(mode="width"))
    assert _params(student) == red.student_params <= _params(teacher) // 4
    assert student.config.hidden_size == plan[hd.NAME].rank
    # the cut of a rank-6 stream alone loses nothing: the logits stay the teacher's
    only = copy.deepcopy(red)
    only.layers[:] = [p for p in red.layers if p.name == hd.NAME]
    exact = reconstruct(teacher, only, X, ReconstructConfig(mode="width", ridge=0.0))
    assert _params(exact) < _params(teacher) // 2
    assert torch.allclose(_out(exact, X), _out(teacher, X), atol=1e-4)


def test_a_tied_gpt2_stream_stays_whole_where_untying_costs_more_than_the_cut_saves():
    X, teacher = _ids(), _big_vocab_gpt2()
    n = _params(teacher)
    # 2 % fewer: a cut unties the head (+5000 x k), so only k <= 15 of 32 fits; heads and units
    # pay for it at a smaller loss
    red = reduce_model(teacher, X, _width(BudgetConfig(params=int(0.98 * n))), "width")
    assert hd.NAME not in red.ranks
    assert red.fixed[hd.NAME].startswith(KEPT_BY_BUDGET) and "unties" in red.fixed[hd.NAME]
    # 20 % fewer is below what heads, units and layers reach (the table stays): the stream can
    floor = int(0.8 * n)
    red = reduce_model(teacher, X, _width(BudgetConfig(params=floor)), "width")
    assert red.ranks[hd.NAME] is not None and red.ranks[hd.NAME] < 16
    student = reconstruct(teacher, red, X, ReconstructConfig(mode="width"))
    assert student.lm_head.weight is not student.transformer.wte.weight
    assert _params(student) == red.student_params <= floor


@pytest.mark.parametrize("build, rows", [(_vit, _images), (_gpt2, _ids)])
def test_the_cost_is_exact_for_every_mix_of_heads_units_layers_and_hidden(build, rows):
    teacher, X = build(), rows()
    stream = hd.find_stream(teacher, X)
    assert isinstance(stream, hd.Stream)
    groups = {g.kind: g for g in tr.transformer_groups(teacher, X) if g.reducible}
    cost = hd.cost_model(teacher, list(groups.values()), stream)
    assert cost.params() == _params(teacher)
    D = stream.width
    for h, f, layers, k in ((4, 64, 2, 32), (3, 40, 2, 20), (1, 7, 1, 2), (2, 64, 1, 31)):
        widths = {
            groups["heads"].name: h,
            groups["ffn"].name: f,
            groups["depth"].name: layers,
            hd.NAME: k,
        }
        model = copy.deepcopy(teacher)
        tr.cut(model, widths, groups=list(groups.values()))
        if k < D:
            cut = hd.find_stream(model, X)
            assert isinstance(cut, hd.Stream)
            basis = hd.HiddenBasis(hd._ones_complement(D), np.ones(D - 1), 0)
            hd.slice_hidden(model, cut, basis, k)
        assert cost.params(widths) == _params(model), widths


def test_the_vit_student_exports_to_onnx_and_round_trips_through_save_pretrained(tmp_path):
    X = _images()
    teacher = _vit()
    red = reduce_model(teacher, X, _width(BudgetConfig(ratio=2)), "width")
    red.layers[:] = [p for p in red.layers if p.name != hd.NAME]
    red.layers.append(
        type(red.layers[0])(hd.NAME, 0, 32, 20, variance=1.0)
    )  # the stream cut whatever the budget chose
    student = reconstruct(teacher, red, X, ReconstructConfig(mode="width"))
    assert student.config.hidden_size == 20 and tr.config_mismatch(student) == ""
    assert len(export_onnx(student, X)) > 0
    student.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert _params(loaded) == _params(student)
    assert torch.allclose(_out(loaded, X), _out(student, X), atol=1e-5)


def test_the_preflight_builds_and_exports_the_hidden_cut_on_two_rows():
    from distill.tasks.compress.hf import HFLogits
    from distill.tasks.compress.preflight import _export, planned_student
    from distill.tasks.platform.config import build_config

    cfg = build_config({}, ["reconstruct.mode=width", "compress.prune.method=structured"])
    teacher = HFLogits(_vit(), "images")
    X = _images(2)
    student, kept = planned_student(teacher, X, cfg)
    assert hd.NAME not in kept
    assert student.hf.config.hidden_size == 16  # half of 32, then structurally pruned
    _export(student, X)


def test_the_targets_size_probe_narrows_the_stream_too():
    """plan.narrowed (the shapes whose file size and latency a target's lines are fitted on)
    cuts the stream with heads, units and layers where it can be cut, not where it cannot."""
    from distill.tasks.compress.plan import narrowed

    X = _images()
    teacher = _vit()
    half = narrowed(teacher, torch.from_numpy(X[:2]), 0.5)
    assert half.config.hidden_size == 16 and _params(teacher) == _params(_vit())
    assert _params(half) < _params(tr.narrowed(teacher, 0.5))
    assert _out(half, X).shape == _out(teacher, X).shape
    bert, ids = _bert(), _ids()  # post-LN: its channels
    assert _params(narrowed(bert, torch.from_numpy(ids[:2]), 0.5)) < _params(tr.narrowed(bert, 0.5))
    flat = TimmNet()  # a head reading the stream without a norm: heads, units, layers only
    assert _params(narrowed(flat, torch.from_numpy(_tokens()[:2]), 0.5)) == _params(
        tr.narrowed(flat, 0.5)
    )


@pytest.mark.parametrize("build, rows", [(_vit, _images), (_bert, _ids)], ids=["vit", "bert"])
def test_the_smallest_reachable_student_counts_the_stream_cut(build, rows):
    """What a target calls reachable (`plan.smallest_params`) is what the width plan reaches
    with the stream at 2 features: a budget of exactly that is planned, one below it is not."""
    from distill.tasks.compress.plan import smallest_params
    from distill.tasks.compress.reduce import BelowSmallest

    teacher, X = build(), rows()
    floor = smallest_params(teacher, torch.from_numpy(X[:2]))
    groups = [g for g in tr.transformer_groups(teacher, X) if g.reducible]
    assert floor < tr.cost_model(teacher, groups).params({g.name: 1 for g in groups})

    def plan(params: int):
        cfg = ReduceConfig(budget=BudgetConfig(params=params), calibration_samples=len(X))
        return reduce_model(teacher, X, cfg, "width")

    assert plan(floor).student_params == floor
    with pytest.raises(BelowSmallest, match=f"smallest reachable student: {floor} params"):
        plan(floor - 1)


@pytest.mark.slow
def test_distill_run_narrows_the_stream_of_an_hf_vit(tmp_path):
    """`distill run` with an hf: ViT in width mode: the reduce stage plans the hidden size, the
    reconstructed student has the planned parameters, student_hf/ holds the narrower config."""
    import json

    import mlflow

    from tests.compress.test_transformer import PIPELINE, _teacher_dir
    from tests.conftest import ROOT, fresh_process

    teacher_dir, npz = _teacher_dir(tmp_path, _vit(), _images(320))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [*PIPELINE, f"teacher.source=hf:{teacher_dir}", f"data.source=npz:{npz}"]
    sets += ["reduce.budget.ratio=2", "register.model_name=hf-vit-hidden"]
    args = [a for s in sets for a in ("--set", s)]
    proc = fresh_process(
        ROOT, "run", str(ROOT / "configs" / "digits.yaml"), *args, "--json", store=uri, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout)
    metrics = run["metrics"]
    assert metrics["reconstructed/params"] == metrics["reduce/student_params"]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_run(run["run_id"]).info.experiment_id
    planned = [r.data.params for r in client.search_runs([experiment])]
    hidden = [int(p["width.hidden"]) for p in planned if p.get("width.hidden", "dense") != "dense"]
    assert hidden and hidden[0] < 32
    local = client.download_artifacts(run["run_id"], "student_hf", str(tmp_path / "got"))
    loaded = AutoModelForImageClassification.from_pretrained(local)
    assert loaded.config.hidden_size == hidden[0]


def test_hf_loadable_keeps_a_bert_student_to_what_its_config_describes(tmp_path):
    """teacher.hf_loadable: a BERT's head and hidden-size cuts (its config derives the head size
    from hidden_size) are not planned, each with the config's reason; the plan still halves the
    parameters (feed-forward width, depth) and the student round-trips through save_pretrained.
    Without it the same budget cuts what the config cannot say, and student_hf.txt names the
    setting."""
    from transformers import AutoModelForSequenceClassification

    from distill.tasks.compress.hf import HINT, HFLogits, keep_loadable, save_student
    from distill.tasks.platform.errors import UserError

    X = _ids()
    free = HFLogits(_bert(layers=4), "sequence classification")
    held = copy.deepcopy(free)
    keep_loadable(held, "tiny-bert")
    assert "hf_loadable=True" in repr(held) and "hf_loadable" not in repr(free)  # cache keys
    kinds = {g.kind: g for g in tr.transformer_groups(held, X)}
    assert kinds["heads"].why_not.startswith("teacher.hf_loadable: BertConfig cannot express")
    assert kinds["ffn"].reducible and kinds["depth"].reducible
    assert hd.hidden_group(held, X).why_not.startswith("teacher.hf_loadable: its config cannot")
    assert hd.hidden_group(free, X).reducible
    assert {g.kind: g for g in tr.transformer_groups(free, X)}["heads"].reducible

    red = reduce_model(held, X, _width(BudgetConfig(ratio=2)), "width")
    cut = {p.name for p in red.layers if p.rank is not None}
    assert cut and cut <= {kinds["ffn"].name, kinds["depth"].name}, cut
    assert {kinds["heads"].name, hd.NAME} <= set(red.fixed)
    student = reconstruct(held, red, X, ReconstructConfig(mode="width"))
    assert _params(student) == red.student_params <= _params(held) // 2
    assert save_student(student, tmp_path / "s") == ""
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s").eval()
    assert _params(loaded) == _params(student.hf)
    assert torch.allclose(_out(loaded, X), _out(student, X), atol=1e-5)

    # the same budget without the setting: a cut the config cannot say, and the way out
    red = reduce_model(free, X, _width(BudgetConfig(ratio=2)), "width")
    unheld = reconstruct(free, red, X, ReconstructConfig(mode="width"))
    why = save_student(unheld, tmp_path / "free")
    assert why.startswith("its BertConfig cannot describe the student") and why.endswith(HINT)
    with pytest.raises(UserError, match=r"^config key 'teacher.hf_loadable': teacher mlp is"):
        keep_loadable(nn.Linear(3, 2), "mlp")


def test_hf_loadable_holds_a_gpt2_to_its_feed_forward_width_and_depth(tmp_path):
    """GPT-2's head size is n_embd / n_head too: under teacher.hf_loadable its heads and stream
    stay, the plan narrows the MLPs, and from_pretrained gives the student's logits."""
    from transformers import AutoModelForCausalLM

    from distill.tasks.compress.hf import HFLogits, keep_loadable, save_student

    X = _ids()
    held = HFLogits(_gpt2(layers=4), "causal LM")
    keep_loadable(held, "tiny-gpt2")
    kinds = {g.kind: g for g in tr.transformer_groups(held, X)}
    assert kinds["heads"].why_not.startswith("teacher.hf_loadable: GPT2Config cannot express")
    assert hd.hidden_group(held, X).why_not.startswith("teacher.hf_loadable: ")
    red = reduce_model(held, X, _width(BudgetConfig(ratio=1.3)), "width")
    cut = {p.name for p in red.layers if p.rank is not None}
    assert cut and cut <= {kinds["ffn"].name, kinds["depth"].name}, cut
    student = reconstruct(held, red, X, ReconstructConfig(mode="width"))
    assert _params(student) == red.student_params < _params(held)
    assert save_student(student, tmp_path / "s") == ""
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert torch.allclose(_out(loaded, X), _out(student.hf, X), atol=1e-5)
