"""YAML from users is bounded (tasks/platform/safe_yaml.py), and the config loader answers any text with
a config or one UserError: a seeded fuzz of the loader, bounded in time."""

import random
import time

import pytest

from distill.tasks.platform import safe_yaml
from distill.tasks.platform.config import PipelineConfig, build_config, load_config
from distill.tasks.platform.errors import UserError


def bomb(levels: int, width: int = 9) -> str:
    lines = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    lines += [
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels + 1)
    ]
    return "\n".join(lines) + "\n"


def test_aliases_are_sized_as_a_walk_would_expand_them():
    # the mapping and its 3 keys; l0 = [x, x, x]: 4; l1 = 3 x l0: 1 + 12; l2 = 3 x l1: 1 + 39
    assert safe_yaml.expanded_size(safe_yaml.load(bomb(2, 3), "f"), "f") == 1 + 3 + 4 + 13 + 40
    anchors = "base: &b {lr: 0.001, epochs: 3}\nfinetune: *b\nteacher: *b\n"  # ordinary use: fine
    assert safe_yaml.load(anchors, "f") == {"base": {"lr": 0.001, "epochs": 3}} | {
        k: {"lr": 0.001, "epochs": 3} for k in ("finetune", "teacher")
    }


@pytest.mark.parametrize(
    "text, message",
    [
        (bomb(9), "f: its aliases expand to more than 100,000 values"),
        ("a: &a [*a]\n", "f: an alias refers to a value that contains it"),
        ("a: &a {b: *a}\n", "f: an alias refers to a value that contains it"),
        ("a: " + "[" * 100 + "]" * 100 + "\n", "f: nested deeper than 64 levels"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "f nests deeper than Python can parse"),
        ("a: [unclosed\n", "f is not valid YAML"),
    ],
)
def test_refused_in_one_line(text, message):
    started = time.monotonic()
    with pytest.raises(UserError) as refused:
        safe_yaml.load(text, "f")
    assert str(refused.value).startswith(message)
    assert time.monotonic() - started < 5  # the bomb is refused without being expanded


def test_a_bomb_in_a_set_value_is_refused():
    with pytest.raises(UserError, match=r"^--set name: its aliases expand"):
        build_config({}, ["name=" + "{" + bomb(9).replace("\n", ", ").rstrip(", ") + "}"])


PIECES = [
    "name",
    "seed",
    "finetune",
    "lr",
    "epochs",
    "reduce",
    "budget",
    "size_kb",
    "data",
    "shape",
    "&a",
    "*a",
    "&b",
    "*b",
    "[",
    "]",
    "{",
    "}",
    ":",
    ",",
    "-",
    " ",
    "\n",
    "  ",
    ".inf",
    ".nan",
    "-1",
    "0",
    "1e999",
    "0.5",
    "'x'",
    '"y"',
    "!!python/object:os.system",
    "<<:",
    "~",
    "null",
    "true",
    "#",
    "|",
    ">",
    "\t",
    "?",
    "%YAML 1.1",
    "---",
    "...",
    "\\x00",
    "é",
]


def test_fuzz_the_config_loader(tmp_path):
    """Random YAML-ish text through load_config: a valid config or one UserError, never another
    exception, a hang or a run-away; 1,500 documents or 20 s, whichever comes first."""
    rng = random.Random(18)
    path = tmp_path / "fuzz.yaml"
    started, tried = time.monotonic(), 0
    while tried < 1500 and time.monotonic() - started < 20:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60)))
        if rng.random() < 0.1:
            text += bomb(rng.randint(3, 12), rng.randint(2, 12))
        path.write_text(text)
        try:
            assert isinstance(load_config(path), PipelineConfig)
        except UserError as err:
            assert "\n" not in str(err), text
        tried += 1
    assert tried >= 200


def test_fuzz_set_overrides():
    """Random `--set key=value` pairs (real keys, YAML-ish values): a config or one UserError."""
    from distill.tasks.platform.config import flatten

    keys = [*flatten(PipelineConfig().model_dump()), "reduce.budget.ratio", "x.y", "seed.a", "a..b"]
    rng = random.Random(18)
    started, tried = time.monotonic(), 0
    while tried < 2000 and time.monotonic() - started < 20:
        pairs = [
            f"{rng.choice(keys)}=" + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))
            for _ in range(rng.randint(1, 3))
        ]
        try:
            assert isinstance(build_config({}, pairs), PipelineConfig)
        except UserError as err:
            assert "\n" not in str(err), pairs
        tried += 1
    assert tried >= 200
