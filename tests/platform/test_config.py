from pathlib import Path

import pytest

from distill.tasks.platform.config import PipelineConfig, build_config, load_config, parse_overrides
from distill.tasks.platform.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_default_config_file_is_valid():
    cfg = load_config(ROOT / "configs" / "digits.yaml")
    assert cfg.teacher.hidden == [512, 512]
    assert cfg.reduce.budget.kind == "size_kb"
    assert cfg.registry.model_name == "distill-digits"


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 3, "c": [1, 2]}, "d": "x"}
    # a later key reopens a section an earlier one set to null; a value stays a value
    assert parse_overrides(["target=null", "target.size_kb=50"]) == {"target": {"size_kb": 50}}
    with pytest.raises(UserError, match=r"--set a\.b\.c: b is both a value and a section"):
        parse_overrides(["a.b=3", "a.b.c=4"])


def test_a_section_set_to_null_then_reopened_holds_only_the_keys_set_after():
    """`--set target=null --set target.X=...` silently brought the file's `size_kb: 100` back."""
    raw = {"target": {"size_kb": 100, "max_accuracy_drop": 0.02}, "seed": 0}
    cfg = build_config(raw, ["target=null", "target.ratio=10"])
    assert (cfg.target.size_kb, cfg.target.ratio) == (None, 10)
    assert cfg.target.max_accuracy_drop == 0.01  # the default: the file's 0.02 went with null
    # the file's size_kb stays gone: a drop-only target (the smallest model within it)
    drop_only = build_config(raw, ["target=null", "target.max_accuracy_drop=0.01"]).target
    assert (drop_only.kind, drop_only.size_kb, drop_only.max_accuracy_drop) == (
        "smallest",
        None,
        0.01,
    )
    assert build_config(raw, ["target.ratio=10"]).target.max_accuracy_drop == 0.02  # no null


def test_budget_override_replaces_the_budget():
    cfg = build_config({"reduce": {"budget": {"size_kb": 100}}}, ["reduce.budget.ratio=10"])
    assert (cfg.reduce.budget.kind, cfg.reduce.budget.value) == ("ratio", 10.0)


def test_yaml_exponent_floats_are_numbers():
    assert build_config({"finetune": {"lr": "1e-3"}}).finetune.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetun.epochs=3"], "config key 'finetun': unknown key"),
        (["finetune.epoch=3"], "config key 'finetune.epoch': unknown key"),
        (
            ["finetune.epochs=three"],
            "config key 'finetune.epochs': Input should be a valid integer",
        ),
        (
            ["reduce.budget.size_kb=-5"],
            "config key 'reduce.budget.size_kb': Input should be greater than 0",
        ),
        (
            ["reduce.budget.ratio=0.5"],
            "config key 'reduce.budget.ratio': Input should be greater than 1",
        ),
        (["register.model_name=bad name!"], "config key 'register.model_name'"),
        (["finetune.alpha=1.5"], "config key 'finetune.alpha'"),
        (["device=tpu"], "config key 'device'"),
        (["finetune"], "--set expects key=value"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        build_config({}, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_low_rank_with_structured_pruning_is_accepted():
    """Structured pruning narrows a low-rank student's ranks (its inner dimensions are groups)."""
    cfg = build_config({}, ["reconstruct.mode=low_rank"])
    assert cfg.compress.prune.method == "structured"


def test_two_budgets_are_rejected():
    with pytest.raises(UserError, match="exactly one"):
        build_config({"reduce": {"budget": {"size_kb": 10, "ratio": 3}}})


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_the_default_config_is_the_packaged_one_where_the_working_directory_has_none(
    tmp_path, monkeypatch
):
    """A pip-installed distill run outside the repository: `distill run` (no config) runs the
    digits.yaml installed with the package; a config named by the user is never replaced."""
    monkeypatch.chdir(tmp_path)
    assert load_config().name == "digits"
    assert load_config().flat() == load_config(ROOT / "configs" / "digits.yaml").flat()
    with pytest.raises(UserError, match="config file not found"):
        load_config("my.yaml")


def test_flat_params_and_digest_are_stable():
    a, b = PipelineConfig(), build_config({})
    assert a.flat()["reduce.budget.size_kb"] == 120.0
    assert a.digest() == b.digest()
    assert a.digest() != build_config({}, ["seed=1"]).digest()


def test_every_config_choice_has_one_implementation():
    """Methods are chosen through name -> implementation tables: the config's choices and the
    tables' keys are the same names, so a new method is one entry in each."""
    import typing

    from distill.tasks.compress.architectures import BUILTIN_ARCHS
    from distill.tasks.compress.prune import PRUNERS
    from distill.tasks.compress.quantize import RUNTIMES
    from distill.tasks.compress.reconstruct import RECONSTRUCTORS
    from distill.tasks.compress.reduce import BASES, PLANNERS
    from distill.tasks.compress.width import SELECTIONS
    from distill.tasks.platform import config

    def choices(model: type, field: str) -> set[str]:
        return set(typing.get_args(model.model_fields[field].annotation))

    assert choices(config.ReduceConfig, "method") == set(BASES)
    assert choices(config.ReconstructConfig, "mode") == set(RECONSTRUCTORS) == set(PLANNERS)
    assert choices(config.ReconstructConfig, "selection") == set(SELECTIONS)
    assert choices(config.PruneConfig, "method") == set(PRUNERS)
    assert choices(config.QuantizeConfig, "runtime") == set(RUNTIMES)
    assert set(config.BUILTIN_ARCHS) == set(BUILTIN_ARCHS)


# (a key of one method, a value other than its default, the switch to another method, the
# switch back to the key's own method)
METHOD_CASES = [
    ("teacher.hidden=[32]", "teacher.arch=cnn", "teacher.arch=mlp"),
    ("teacher.channels=[8]", "teacher.arch=mlp", "teacher.arch=cnn"),
    ("teacher.init_args={width: 3}", "teacher.arch=mlp", "teacher.arch=zoo:Net"),
    ("reduce.budget.ratio=10", "target.size_kb=50", "target=null"),
    ("compress.prune.amount=0.5", "target.size_kb=50", "target=null"),
    ("reconstruct.selection=importance", "reconstruct.mode=low_rank", "reconstruct.mode=width"),
    ("reconstruct.ridge=0.01", "reconstruct.mode=low_rank", "reconstruct.mode=width"),
    (
        "compress.prune.criterion=l1",
        "compress.prune.method=unstructured",
        "compress.prune.method=structured",
    ),
]


@pytest.mark.parametrize("key_value, other, own", METHOD_CASES)
def test_a_key_of_another_method_is_refused_by_name(key_value, other, own):
    from distill.tasks.platform.config import METHOD_KEYS

    key = key_value.split("=")[0].removesuffix(".ratio")  # reduce.budget is one key
    assert key in METHOD_KEYS
    with pytest.raises(UserError, match=rf"^config key '{key}': applies only .* \(here "):
        build_config({}, [other, key_value])  # the schema's defaults: no target, an mlp
    build_config({}, [own, key_value])  # under its own method it is taken
    build_config({}, [other])  # left at its default it says nothing (`--from-run`)


def test_every_method_key_is_tested():
    from distill.tasks.platform.config import METHOD_KEYS

    tested = {c[0].split("=")[0].removesuffix(".ratio") for c in METHOD_CASES}
    assert tested == set(METHOD_KEYS)
