"""The pre-flight: the planned student built, trained a step and exported on two rows, before any
stage; a model the configured mode cannot handle fails in one line naming the module, its class,
the setting and what works instead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.tasks.compress.architectures import build_teacher
from distill.tasks.compress.context import RunContext
from distill.tasks.compress.data import load_dataset
from distill.tasks.compress.preflight import PreflightFailed, preflight, preflight_config
from distill.tasks.platform.config import build_config
from tests.conftest import TINY

NOT_MLP = [s for s in TINY if not s.startswith("teacher.hidden")]  # a module:Name teacher
ATTENTION = [*NOT_MLP, "teacher.arch=tests.zoo:HeadsAttentionNet", "data.shape=[8, 8]"]


def _setup(overrides: list[str]):
    cfg = build_config({}, overrides)
    data = load_dataset(cfg.data, cfg.seed)
    torch.manual_seed(0)
    return cfg, data, build_teacher(cfg.teacher, data)


@pytest.mark.parametrize("overrides", [[], TINY], ids=["digits-target", "tiny"])
def test_the_digits_mlp_passes(overrides):
    cfg, data, teacher = _setup(overrides)
    preflight(teacher, data, cfg)  # the first in a process imports the ONNX exporter
    result = preflight(teacher, data, cfg)
    assert set(result.checks) == {"teacher", "student", "kd step", "onnx export"}
    assert result.student_params < result.teacher_params
    assert result.kept_whole == {}
    # its cost (1.1 s with the 512-512 teacher, 0.5 s TINY, warm, on this 2-core machine; most of
    # it the ONNX export) is a speed figure, measured, not asserted: a loaded machine varies
    assert result.seconds > 0


def test_attention_that_reshapes_into_heads_fails_in_one_line():
    cfg, data, teacher = _setup(ATTENTION)
    with pytest.raises(PreflightFailed) as failed:
        preflight(teacher, data, cfg)
    line = str(failed.value)
    assert "\n" not in line
    assert line.startswith(
        "pre-flight: reconstruct.mode=width cannot narrow model.attn (HeadsAttention): "
        "with model.attn.qkv narrowed, its forward reshapes to a fixed shape (shape '["
    ), line
    # structured pruning cuts the same units: both settings change
    assert line.endswith(
        "; reconstruct.mode=low_rank and compress.prune.method=unstructured handle it"
    ), line


def test_the_setting_it_names_passes():
    cfg, data, teacher = _setup(
        [*ATTENTION, "reconstruct.mode=low_rank", "compress.prune.method=unstructured"]
    )
    assert preflight(teacher, data, cfg).student_params < sum(
        p.numel() for p in teacher.parameters()
    )


def test_with_a_target_the_alternative_says_the_target_must_go():
    target = [s for s in ATTENTION if s != "target=null" and not s.startswith("reduce.budget")]
    cfg, data, teacher = _setup([*target, "target.size_kb=20"])
    assert cfg.target is not None
    with pytest.raises(PreflightFailed, match=r"without a target: target: null and a reduce"):
        preflight(teacher, data, cfg)


def test_low_rank_student_that_structured_pruning_cannot_narrow():
    cfg, data, teacher = _setup([*ATTENTION, "reconstruct.mode=low_rank"])
    with pytest.raises(PreflightFailed) as failed:
        preflight(teacher, data, cfg)
    assert str(failed.value).startswith(
        "pre-flight: compress.prune.method=structured cannot narrow model.attn (HeadsAttention)"
    )
    assert str(failed.value).endswith("; compress.prune.method=unstructured handles it")


class TrainModeFault(nn.Module):
    """Fine in eval mode (the teacher check passes), raises in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("dropout mask has the wrong size")
        return self.body(x)


def test_a_model_that_raises_on_forward_is_named(digits):
    cfg = build_config({}, TINY)
    with pytest.raises(PreflightFailed) as failed:
        preflight(TrainModeFault(), digits, cfg)
    assert str(failed.value) == (
        "pre-flight: the teacher's training step fails in TrainModeFault: RuntimeError: "
        "dropout mask has the wrong size (config key 'teacher.arch')"
    )


class NaNHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).log()  # negative logits: NaN


def test_nan_outputs_say_where_they_start(digits):
    with pytest.raises(PreflightFailed, match="outputs on 2 training rows hold NaN or inf; it "):
        preflight(NaNHead(), digits, build_config({}, TINY))


class GroupedConvNet(nn.Module):
    """A grouped (not depthwise) convolution: no re-fit rule, kept whole as the README says."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_layers_without_a_refit_rule_are_kept_whole_and_the_run_goes_on(digits):
    result = preflight(GroupedConvNet(), digits, build_config({}, TINY))
    assert result.kept_whole, result
    assert all("grouped convolution (groups=2)" in why for why in result.kept_whole.values())


def test_a_pass_is_remembered_by_the_run_not_the_process(digits):
    cfg = build_config({}, TINY)
    run = RunContext()
    first = run.preflight(cfg, digits)
    assert run.preflight(cfg, digits) is first  # the same result: not run again in this run
    assert RunContext().preflight(cfg, digits) is not first  # another run flies its own
    assert preflight_config(cfg, digits) is not preflight_config(cfg, digits)  # no module memo


def test_validation_rows_too_few_for_the_allowance_are_named_before_any_stage(capfd):
    """180 digits validation rows: one row is 0.56 points, more than half of 0.5 points."""
    cfg, data, _ = _setup(["target.size_kb=100", "target.max_accuracy_drop=0.005"])
    assert len(data.y_val) == 180
    preflight_config(cfg, data)
    err = capfd.readouterr().err.splitlines()
    coarse = [line for line in err if "validation rows" in line]
    assert len(coarse) == 1 and coarse[0].startswith(
        "distill: 180 validation rows are coarse for target.max_accuracy_drop=0.005"
    )
    assert "one row = 0.0056" in coarse[0] and ">= 400 validation rows" in coarse[0]
    cfg, data, _ = _setup(["target.size_kb=100", "target.max_accuracy_drop=0.02"])  # 3.6 rows
    preflight_config(cfg, data)
    assert "validation rows" not in capfd.readouterr().err


class _ValueBranch(nn.Module):
    """A forward whose path depends on the values (`if h.sum() > 0`): an ONNX graph of one trace
    would answer other rows with the branch its example took."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h) if h.sum() > 0 else self.fc2(-h)


def test_a_value_dependent_branch_fails_the_export_in_one_line():
    cfg, data, _ = _setup(TINY)
    with pytest.raises(PreflightFailed) as failed:
        preflight(_ValueBranch(), data, cfg)
    line = str(failed.value)
    assert "\n" not in line
    # the cause torch.export found, not its wrapper's "step 1/3" (and not torch's wrapper module)
    assert line.startswith(
        "pre-flight: the student does not export to ONNX (the quantize stage's export) in "
        "_ValueBranch: its forward branches on a tensor's values"
    ), line
    assert line.endswith("torch.where or torch.cond keep both branches"), line
