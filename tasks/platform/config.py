"""The pipeline's configuration: one pydantic schema, loaded from YAML, overridable by `--set`.

Every model is strict, frozen and forbids unknown keys, so a typo in a YAML file fails
with the key's dotted name instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from distill.tasks.platform import safe_yaml
from distill.tasks.platform.errors import UserError

DEFAULT_CONFIG = Path("configs/digits.yaml")
# installed with the package (distill/configs -> ../configs in the source tree): the default
# where the working directory has no configs/digits.yaml (a pip-installed distill run elsewhere)
PACKAGED_CONFIGS = Path(__file__).parents[2] / "configs"


def resolve_config(path: Path) -> Path:
    """`path`, except the default configs/digits.yaml where the working directory has none: the
    copy installed with distill."""
    if path == DEFAULT_CONFIG and not path.is_file():
        packaged = PACKAGED_CONFIGS / DEFAULT_CONFIG.name
        if packaged.is_file():
            return packaged
    return path


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` (YAML floats) in any number are refused with the key
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)


class DataConfig(Strict):
    # sklearn:NAME, csv:PATH, parquet:PATH or npz:PATH (arrays X, y; or X_train, y_train, ...)
    source: str = "sklearn:digits"
    label: str = "target"  # csv/parquet: the label column
    shape: list[Annotated[int, Field(gt=0)]] | None = None  # one row's shape, e.g. [1, 8, 8]
    test_size: float = Field(0.2, gt=0, lt=1)  # not used when the user gave a split
    val_size: float = Field(0.1, gt=0, lt=1)  # of all rows, also when carved from the user's train
    # false: the features reach the model as given (mean 0, scale 1; integer features such as
    # token ids as int64). Left out of a pipeline config: on when distill trains the teacher
    # (teacher.source train), off for a loaded one, which takes its inputs as it was trained on
    # them (PipelineConfig fills it in; null means the same)
    standardize: bool = True
    split_column: str | None = None  # csv/parquet column of train / val / test: the user's split
    # auto: text or integral labels are classes, non-integer numbers a regression target; a label
    # with more than 10 distinct integers stops and asks (classes or a quantity?)
    task: Literal["auto", "classification", "regression"] = "auto"
    # hf:DIR, a save_pretrained tokenizer: the source's one text column becomes int64 token ids
    # (tasks/compress/tokens.py), padded to the longest row, at most max_length tokens
    tokenizer: str | None = None
    max_length: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _ids_unscaled_by_default(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("tokenizer") and raw.get("standardize") is None:
            return raw | {"standardize": False}
        return raw

    @field_validator("tokenizer")
    @classmethod
    def _ids_are_not_scaled(cls, tokenizer: str | None, info: ValidationInfo) -> str | None:
        if tokenizer is not None and info.data.get("standardize"):
            raise ValueError(
                "token ids reach the model as they are, not standardized "
                "(set data.standardize: false, or leave it out)"
            )
        return tokenizer


BUILTIN_ARCHS = ("mlp", "cnn")  # tasks/compress/architectures.py builds them
ARCH_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # module.sub:Name


class TeacherConfig(Strict):
    # train (on the data), file:PATH (weights or TorchScript), hf:DIR (save_pretrained),
    # models:/NAME@ALIAS or runs:/ID/PATH (MLflow)
    source: str = "train"
    # built-in `mlp` / `cnn`, or `module:Name`: an nn.Module class or a function returning one
    arch: str = "mlp"
    init_args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of module:Name
    hidden: list[int] = Field(default_factory=lambda: [512, 512])  # mlp only
    channels: list[int] = Field(default_factory=lambda: [16, 32])  # cnn only
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(8, ge=1)
    trust_pickle: bool = (
        False  # file: and MLflow teachers: allow a whole pickled module (runs code)
    )
    # hf: teachers: cut only what the model's config can describe, so that student_hf/ loads
    # with from_pretrained (BERT, GPT-2: no head or hidden-size cut; feed-forward width, depth)
    hf_loadable: bool = False

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch in BUILTIN_ARCHS or ARCH_IMPORT_PATH.match(arch):
            return arch
        raise ValueError(f"expected mlp, cnn or an import path module:Name, got {arch!r}")

    @field_validator("init_args")
    @classmethod
    def _json_like(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(init_args, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"must be JSON-like data (numbers, strings, lists, mappings): {err}"
            ) from None
        return init_args

    @model_validator(mode="after")
    def _loadable_is_hf(self) -> TeacherConfig:
        if self.hf_loadable and not self.source.startswith(("hf:", "python:")):
            raise ValueError(
                "teacher.hf_loadable keeps a Hugging Face student to what its config describes: "
                f"it needs an hf:DIR teacher, not {self.source!r}"
            )
        return self

    @model_validator(mode="after")
    def _positive_widths(self) -> TeacherConfig:
        if any(h < 1 for h in self.hidden) or any(c < 1 for c in self.channels):
            raise ValueError("hidden sizes and channels must be positive")
        return self


MIN_VARIANCE = 0.5  # reduce.budget.variance below this leaves nothing to fine-tune or prune


class BudgetConfig(Strict):
    """Exactly one target for the reduced student (parameters counted in fp32)."""

    size_kb: float | None = Field(None, gt=0)
    params: int | None = Field(None, gt=0)
    ratio: float | None = Field(None, gt=1)
    variance: float | None = Field(None, gt=0, le=1)

    @field_validator("variance")
    @classmethod
    def _meaningful_variance(cls, value: float | None) -> float | None:
        # below half of each layer's output variance, every layer keeps a unit or two: a student
        # that no stage after can fine-tune or prune (1e-9 failed at pruning, 15 s in)
        if value is not None and value < MIN_VARIANCE:
            raise ValueError(
                f"{value:g} keeps less than half of each layer's output variance (every layer "
                f"down to a unit or two); give {MIN_VARIANCE:g} to 1, e.g. 0.95"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetConfig:
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of size_kb, params, ratio, variance"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))


TARGET_KINDS = ("size_kb", "ratio", "params", "latency_ms_b1")
SMALLEST = "smallest"  # a drop-only target's kind: the smallest served file within the drop
DROP_KEYS = ("max_accuracy_drop", "max_r2_drop")


class TargetConfig(Strict):
    """What ships (tasks/compress/target.py): at most one of the final file's size, its ratio to
    the teacher's file, its parameters or its batch-1 latency in the runtime that serves it; and
    the accuracy it may lose vs the teacher, decided on validation rows at every lossy step. None
    of the four, with `max_accuracy_drop` (`max_r2_drop`) set: a drop-only target, the smallest
    served file within that drop (kind `smallest`, tasks/compress/smallest.py)."""

    size_kb: float | None = Field(None, gt=0)  # the served file on disk
    ratio: float | None = Field(None, gt=1)  # teacher file size / served file size
    params: int | None = Field(None, gt=0)
    latency_ms_b1: float | None = Field(None, gt=0)  # batch 1, in the serving runtime
    max_accuracy_drop: float = Field(0.01, ge=0, lt=1)  # teacher - model, validation rows
    max_r2_drop: float = Field(0.01, ge=0)  # regression: teacher R² - model R², validation rows
    # a step is rolled back when its drop is above the allowance with this confidence
    # (one-sided paired bootstrap on the validation rows: tasks/compress/guard.py)
    confidence: float = Field(0.9, ge=0.5, lt=1)
    # drop-only target (and a size or latency limit below the smallest reachable model):
    # candidates built at most (each exported and checked): up to half rebuilt from the teacher
    # at smaller reduce budgets (reduce, reconstruct, KD; a bisection), the rest pruning rounds
    # (pruned, KD-recovered) that halve the parameters while the guard holds, then bisect
    max_builds: int = Field(6, ge=1)
    # size or latency target: rebuilds from the reduce stage at a budget corrected by what the
    # last build's served model measured, where pruning would not close the miss (0: none)
    max_rebuilds: int = Field(3, ge=0)
    # size_kb, ratio or params target: the first student is distilled at this many times the
    # parameters the plan sized (at most half the teacher's), then pruned to the limit in
    # guarded rounds (a round the guard rolls back: rebuilt at the size planned); null: the
    # teacher family's recipe (2 for a Hugging Face transformer, 1 for anything else)
    widen: float | None = Field(None, ge=1)
    # classification: training rows held out from every fit of the student (calibration, KD,
    # recovery); its disagreement with the teacher on them bounds its accuracy drop with no
    # labels, so they can show a drop within the allowance where few validation rows cannot
    # (tasks/compress/guard.py); 0: validation rows alone
    agreement_rows: int = Field(0, ge=0)
    # classification: npz:PATH, an array X of rows like the data's with no labels (rows you have
    # beyond the labeled ones): the agreement guard asks teacher and student about them too,
    # and no training row is taken for it
    unlabeled: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> TargetConfig:
        given = [k for k in TARGET_KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"give one of {', '.join(TARGET_KINDS)}, not {len(given)} "
                f"(got {', '.join(given)}); or none, with max_accuracy_drop, for the smallest "
                "model within the drop"
            )
        if not given and not set(DROP_KEYS) & self.model_fields_set:
            raise ValueError(
                f"give one of {', '.join(TARGET_KINDS)}, or max_accuracy_drop (max_r2_drop) "
                "alone for the smallest model within the drop"
            )
        # a value equal to its default says nothing: `--from-run` replays set every key
        if given and self.max_builds != type(self).model_fields["max_builds"].default:
            raise ValueError(
                f"max_builds applies only to a drop-only target (here {given[0]} is set); "
                f"remove it or {given[0]}"
            )
        if self.widen is not None and (not given or given[0] == "latency_ms_b1"):
            raise ValueError(
                "widen applies only to a size_kb, ratio or params target"
                + (f" (here {given[0]} is set)" if given else " (a drop-only target searches)")
            )
        if not given and self.max_rebuilds != type(self).model_fields["max_rebuilds"].default:
            raise ValueError(
                "max_rebuilds applies only to a size_kb, ratio, params or latency_ms_b1 target; "
                "a drop-only target builds at most max_builds candidates"
            )
        return self

    @property
    def kind(self) -> str:
        """size_kb | ratio | params | latency_ms_b1, or `smallest` (drop-only)."""
        return next((k for k in TARGET_KINDS if getattr(self, k) is not None), SMALLEST)

    @property
    def value(self) -> float:
        """The kind's value; a drop-only target's: its drop (max_r2_drop where only it is set)."""
        if self.kind != SMALLEST:
            return float(getattr(self, self.kind))
        only_r2 = "max_accuracy_drop" not in self.model_fields_set
        return self.max_r2_drop if only_r2 else self.max_accuracy_drop


class ReduceConfig(Strict):
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(size_kb=120.0))
    calibration_samples: int = Field(1024, ge=2)
    batch_size: int = Field(256, ge=1)
    method: Literal["pca", "svd"] = "pca"  # svd: data-free bases from the weights (low_rank only)
    # data: a Hugging Face token model keeps the embedding rows of the ids its training rows use
    # and one row for every other id (tasks/compress/vocab.py); all: the whole vocabulary
    vocab: Literal["all", "data"] = "all"


class ReconstructConfig(Strict):
    # width: fewer units per layer, re-fitted by least squares; low_rank: each layer a product
    mode: Literal["low_rank", "width"] = "width"
    selection: Literal["pqr", "importance"] = "pqr"  # width mode: which units to keep
    # width mode: relative ridge of the consumer re-fit. 0.3 (not ~0) costs accuracy before
    # fine-tuning but gives a start KD trains much further (benchmarks/quality.py)
    ridge: float = Field(0.3, ge=0)


class FinetuneConfig(Strict):
    # left out (null): the teacher's family's recipe, filled in once the teacher is loaded
    # (tasks/compress/recipe.py): 10 epochs at 1e-3 for a Hugging Face transformer, else 80 at 3e-3
    epochs: int | None = Field(None, ge=0)
    lr: float | None = Field(None, gt=0)  # left out (null): the teacher's family's, as epochs
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    temperature: float = Field(4.0, gt=0)  # classification only: a regression output has no softmax
    alpha: float = Field(0.9, ge=0, le=1)  # weight of the teacher's outputs vs the labels
    patience: int = Field(20, ge=1)
    huber_delta: float | None = Field(None, gt=0)  # regression: Huber loss instead of MSE
    # a time box per training run (KD, and each pruning round's recovery): no epoch starts after
    # this many minutes; the best epoch so far is restored and the stage's run says it stopped
    max_minutes: float | None = Field(None, gt=0)


class PruneConfig(Strict):
    # structured: whole units removed (smaller and faster); unstructured: zeroed weights
    method: Literal["unstructured", "structured"] = "structured"
    amount: float = Field(
        0.3, ge=0, lt=1
    )  # of all weights (unstructured) or of each hidden layer's units
    criterion: Literal["l2", "l1", "activation"] = "l2"  # structured: which units go first
    rounds: int = Field(2, ge=1)  # structured: prune -> recover steps on a cubic schedule
    # KD epochs after each round; left out (null): the teacher's family's recipe, filled in once
    # the teacher is loaded (tasks/compress/recipe.py): 6 for a Hugging Face transformer, else 3
    recovery_epochs: int | None = Field(None, ge=0)


class QuantizeConfig(Strict):
    enabled: bool = True  # int8 is tried; it ships only if smaller and no slower than fp32
    runtime: Literal["onnxruntime", "torch"] = "onnxruntime"  # what serves the registered model
    max_abs_diff: float = Field(1e-3, gt=0)
    # rows per call the served model is chosen for: int8 ships only when its file is smaller and
    # it is no slower than fp32 at this batch (both measured, "slower" meaning by over 5 %; the
    # quantize stage logs why); a `target.latency_ms_b1` decides at batch 1 instead
    batch: int = Field(256, ge=1)
    # int8 ships only when its classes agree with the fp32 export's on this fraction of 1,024
    # training rows (label-free; not checked for a regression output): where all-int8 does not,
    # int8 of the weighted ops alone is tried (a transformer's attention), then the layers that
    # cost the agreement most are left in fp32 until it does; a broken int8 model is refused
    # here; a target's guard decides finer, on validation accuracy
    min_agreement: float = Field(0.95, ge=0, le=1)
    # measured: the rule above, by size and latency measured at `batch`; fp32 / int8: that format
    # ships whatever the latency says (int8 still held to min_agreement). `distill run --from-run`
    # pins the format the original run shipped, so that a near-tie does not flip it
    format: Literal["measured", "fp32", "int8"] = "measured"


class CompressConfig(Strict):
    prune: PruneConfig = Field(default_factory=PruneConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)


class EvaluateConfig(Strict):
    latency_repeats: int = Field(100, ge=1)
    large_batch: int = Field(256, ge=2)
    plots: bool = True  # pareto, confusion matrix, t-SNE, training curves as MLflow artifacts
    tsne_rows: int = Field(500, ge=4)  # test rows embedded by t-SNE (its cost grows with rows)


class RegisterConfig(Strict):
    enabled: bool = True  # the served model registered in MLflow's registry (alias challenger)
    model_name: str = Field("distill-digits", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class PromoteConfig(Strict):
    """Gates `distill promote` checks before moving alias `champion`; None switches a gate off."""

    max_accuracy_drop: float | None = Field(0.01, ge=0)  # teacher accuracy - student accuracy
    min_accuracy: float | None = Field(None, ge=0, le=1)
    max_r2_drop: float | None = Field(0.01, ge=0)  # regression: teacher R² - student R² (test)
    min_r2: float | None = Field(None, le=1)  # regression: test R² at least this
    max_size_kb: float | None = Field(None, gt=0)
    max_latency_ms_b1: float | None = Field(None, gt=0)
    allow_target_missed: bool = False  # promote a version tagged distill.target_met=false
    vs_champion: bool = True  # no worse than the current champion on common held-out rows
    champion_tolerance: float = Field(
        0.0, ge=0
    )  # accuracy (R²) the challenger may lose vs the champion


class PipelineConfig(Strict):
    model_config = ConfigDict(
        strict=True,
        frozen=True,
        extra="forbid",
        validate_by_name=True,
        serialize_by_alias=True,
        allow_inf_nan=False,
    )

    name: str = "digits"  # the run's name in MLflow and Prefect (and the config file's stem)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # what scikit-learn and numpy take
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # auto: cuda where there is one
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    # set: distill plans reduce, prune and quantize to meet it (reduce.budget and
    # compress.prune.amount apply only without a target)
    target: TargetConfig | None = None
    reduce: ReduceConfig = Field(default_factory=ReduceConfig)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    # `register` would shadow BaseModel.register (ABCMeta), hence the alias
    registry: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    promote: PromoteConfig = Field(default_factory=PromoteConfig)

    @model_validator(mode="before")
    @classmethod
    def _standardize_for_the_teacher(cls, raw: Any) -> Any:
        """`data.standardize` left out (or null): on for a teacher distill trains, off for a
        loaded one (`file:`, `hf:`, MLflow): its inputs are what it was trained on."""
        if not isinstance(raw, dict):
            return raw
        data, teacher = raw.get("data"), raw.get("teacher")
        source = teacher.source if isinstance(teacher, TeacherConfig) else None
        if isinstance(teacher, dict):
            source = teacher.get("source", "train")
        trained = (source or "train") == "train"
        if isinstance(data, DataConfig):
            if "standardize" not in data.model_fields_set:
                data = data.model_copy(update={"standardize": trained and data.tokenizer is None})
        elif data is None or isinstance(data, dict):
            data = dict(data or {})
            if data.get("standardize") is None:  # token ids are never scaled
                data["standardize"] = trained and data.get("tokenizer") is None
        return raw | {"data": data}

    @model_validator(mode="after")
    def _svd_is_low_rank(self) -> PipelineConfig:
        if self.reduce.method == "svd" and self.reconstruct.mode != "low_rank":
            raise ValueError(
                "reduce.method=svd needs reconstruct.mode=low_rank (width mode is data-driven)"
            )
        return self

    @model_validator(mode="after")
    def _loadable_is_width(self) -> PipelineConfig:
        if self.teacher.hf_loadable and self.reconstruct.mode != "width":
            raise ValueError(
                "teacher.hf_loadable needs reconstruct.mode=width: low-rank factors are layers "
                "a Hugging Face config cannot describe"
            )
        return self

    @model_validator(mode="after")
    def _target_plans_widths(self) -> PipelineConfig:
        if self.target is None:
            return self
        if self.reconstruct.mode != "width":
            raise ValueError("target plans units per layer: it needs reconstruct.mode=width")
        if self.compress.prune.method != "structured":
            raise ValueError(
                "target prunes whole units (zeros do not shrink the file): "
                "it needs compress.prune.method=structured"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """`{'reduce.budget.size_kb': 250.0, ...}`: the form MLflow params take."""
        return flatten(self.model_dump())

    def digest(self) -> str:
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# keys that mean something for one task only: set (to a value, not null) on a run of the other
# task, they are refused with their name rather than silently ignored
CLASSIFICATION_KEYS = {
    ("finetune", "temperature"): "softens class probabilities; a regression output has none",
    ("target", "max_accuracy_drop"): "use target.max_r2_drop",
    ("target", "agreement_rows"): "agreement bounds an accuracy drop, not an R² drop",
    ("target", "unlabeled"): "agreement bounds an accuracy drop, not an R² drop",
    ("promote", "max_accuracy_drop"): "use promote.max_r2_drop",
    ("promote", "min_accuracy"): "use promote.min_r2",
}
REGRESSION_KEYS = {
    ("finetune", "huber_delta"): "a regression loss",
    ("target", "max_r2_drop"): "use target.max_accuracy_drop",
    ("promote", "max_r2_drop"): "use promote.max_accuracy_drop",
    ("promote", "min_r2"): "use promote.min_accuracy",
}


def task_key_conflict(cfg: PipelineConfig, task: str) -> str | None:
    """The first key set in `cfg` that belongs to the other task, as one line; None if none."""
    other = CLASSIFICATION_KEYS if task == "regression" else REGRESSION_KEYS
    for (section, key), hint in other.items():
        part = getattr(cfg, section)
        value = None if part is None else getattr(part, key)
        # a value set to its default says nothing: a config rebuilt from a run's record
        # (`--from-run`) sets every key
        if value is None or value == type(part).model_fields[key].default:
            continue
        kind = "classification" if task == "regression" else "regression"
        return (
            f"config key '{section}.{key}': a {kind} setting, but this is a {task} run "
            f"(data.task); remove it ({hint})"
        )
    return None


def check_task_keys(cfg: PipelineConfig, task: str) -> None:
    """One UserError naming a key of the other task (`task_key_conflict`): when the config is
    built for an explicit `data.task`, and once the data decided an `auto` one."""
    line = task_key_conflict(cfg, task)
    if line is not None:
        raise UserError(line)


# keys that apply under one method only: set (to a value other than their default) under another,
# they are refused with their name rather than silently ignored. key -> (the setting that
# decides, whether the key applies under its value, where the key applies in words)
def _only_with(switch: str, value: Any) -> tuple[str, Callable[[Any], bool], str]:
    return switch, lambda chosen: chosen == value, f"with {switch} {value}"


_WITHOUT_TARGET = ("target", lambda target: target is None, "without a target")
METHOD_KEYS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "teacher.hidden": _only_with("teacher.arch", "mlp"),
    "teacher.channels": _only_with("teacher.arch", "cnn"),
    "teacher.init_args": (
        "teacher.arch",
        lambda arch: arch not in BUILTIN_ARCHS,
        "with a teacher.arch module:Name",
    ),
    "reduce.budget": _WITHOUT_TARGET,
    "reconstruct.selection": _only_with("reconstruct.mode", "width"),
    "reconstruct.ridge": _only_with("reconstruct.mode", "width"),
    "compress.prune.amount": _WITHOUT_TARGET,
    "compress.prune.criterion": _only_with("compress.prune.method", "structured"),
}


def _value(cfg: BaseModel, dotted: str) -> tuple[Any, Any]:
    """The value at `dotted` in `cfg` and its schema default."""
    *path, key = dotted.split(".")
    part = cfg
    for name in path:
        part = getattr(part, name)
    field = type(part).model_fields[key]
    default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
    return getattr(part, key), default


def method_key_conflict(cfg: PipelineConfig) -> str | None:
    """The first key of `METHOD_KEYS` set in `cfg` where its method is not chosen, as one line."""
    for key, (switch, applies, where) in METHOD_KEYS.items():
        value, default = _value(cfg, key)
        chosen, _ = _value(cfg, switch)
        # a value equal to its default says nothing: `--from-run` replays set every key
        if value != default and not applies(chosen):
            here = f"{switch} is set" if isinstance(chosen, BaseModel) else f"{switch}={chosen}"
            return (
                f"config key '{key}': applies only {where} (here {here}); "
                f"remove it or change {switch}"
            )
    return None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class _Reopened(dict):
    """A section an override set to null, then gave keys again: it replaces the config file's
    section instead of merging into it."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`['reduce.budget.ratio=10', 'finetune.epochs=5']` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {pair!r}")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if part in node and node[part] is None:
                # a section set to null earlier (`target=null`) reopens empty: what the config
                # file had there stays gone, only the keys set after it are in it
                node[part] = _Reopened()
            elif node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is both a value and a section")
        if parts[:-1] == ["reduce", "budget"]:
            node.clear()  # the budget is one-of: a later budget key replaces an earlier one
        node[parts[-1]] = safe_yaml.load(raw, f"--set {key.strip()}") if raw.strip() else None
    return tree


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge; a budget override replaces the whole budget (it is one-of), and a target's
    kind (size_kb, ratio, ...) replaces the other kinds (max_accuracy_drop stays)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, _Reopened):
            out[key] = dict(value)
        elif key == "budget" and isinstance(value, dict):
            out[key] = value
        elif (
            key == "target"
            and isinstance(value, dict)
            and isinstance(out.get(key), dict)
            and set(value) & set(TARGET_KINDS)
        ):
            kept = {k: v for k, v in out[key].items() if k not in TARGET_KINDS}
            out[key] = kept | value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce_yaml_numbers(tree: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; accept numeric strings only where they are numbers."""
    if isinstance(tree, dict):
        return {k: _coerce_yaml_numbers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_coerce_yaml_numbers(v) for v in tree]
    if isinstance(tree, str):
        try:
            return float(tree) if any(c in tree.lower() for c in ".e") else tree
        except ValueError:
            return tree
    return tree


def validation_message(err: ValidationError, what: str = "config key") -> str:
    """One line for a schema error: `WHAT 'dotted.key': reason (and N more)`."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")  # pydantic's prefix to our validators' own words
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{what} '{where}': {msg}{more}"


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> PipelineConfig:
    tree = merge(raw, parse_overrides(overrides or []))
    try:
        cfg = PipelineConfig.model_validate(_coerce_yaml_numbers(tree))
    except ValidationError as err:
        raise UserError(validation_message(err)) from None
    line = method_key_conflict(cfg)
    if line is not None:
        raise UserError(line)
    if cfg.data.task != "auto":
        check_task_keys(cfg, cfg.data.task)
    return cfg


def read_yaml(path: Path, kind: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping, or one UserError naming the file (`kind` says what it is)."""
    if path.is_dir():
        raise UserError(f"{kind} {path} is a directory, not a YAML file")
    if not path.is_file():
        raise UserError(f"{kind} not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{kind} {path} could not be read: {err}".splitlines()[0]) from None
    raw = safe_yaml.load(text, f"{kind} {path}") or {}
    if not isinstance(raw, dict):
        raise UserError(f"{kind} {path} must hold a mapping at the top level")
    return raw


def load_config(
    path: Path | str | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    return build_config(read_yaml(resolve_config(Path(path or DEFAULT_CONFIG))), overrides)
