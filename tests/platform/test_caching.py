"""Content-hash cache keys: equal content gives equal keys, any change in inputs or code a new one."""

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prefect.serializers import PickleSerializer

from distill.flows.caching import stage_cache_key
from distill.flows.stages import (
    finetune_task,
    fit_task,
    quantize_task,
    reconstruct_task,
    reduce_task,
    smallest_task,
    teacher_task,
)
from distill.tasks.compress.architectures import build_mlp
from distill.tasks.compress.finetune import History
from distill.tasks.compress.guard import Guard
from distill.tasks.compress.plan import Costs, plan_target
from distill.tasks.compress.reduce import reduce_model
from distill.tasks.compress.target import Search
from distill.tasks.platform.caching import (
    Uncacheable,
    code_modules,
    content_hash,
    teacher_source_fingerprint,
)
from distill.tasks.platform.config import (
    BudgetConfig,
    PipelineConfig,
    ReduceConfig,
    TargetConfig,
    TeacherConfig,
)


def _key(task, **inputs):
    return stage_cache_key(SimpleNamespace(task=task), inputs)


def test_a_module_is_keyed_by_architecture_and_weights():
    torch.manual_seed(0)
    model = build_mlp(8, [16], 3)
    twin = copy.deepcopy(model)
    assert content_hash(model) == content_hash(twin)
    with torch.no_grad():
        twin[0].weight[0, 0] += 1e-6
    assert content_hash(model) != content_hash(twin)
    assert content_hash(build_mlp(8, [16], 3)) != content_hash(build_mlp(8, [17], 3))


def test_arrays_configs_and_dataclasses_are_keyed_by_content(digits):
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert content_hash(X) == content_hash(X.copy())
    assert content_hash(X) != content_hash(X.astype(np.float64))  # same values, other dtype
    assert content_hash(X) != content_hash(X.reshape(4, 3))
    assert content_hash(ReduceConfig()) == content_hash(ReduceConfig())
    assert content_hash(ReduceConfig()) != content_hash(ReduceConfig(calibration_samples=512))
    assert content_hash(digits) == content_hash(
        dataclasses.replace(digits, X_train=digits.X_train.copy())
    )
    moved = digits.X_train.copy()
    moved[0, 0] += 1
    assert content_hash(digits) != content_hash(dataclasses.replace(digits, X_train=moved))
    # where the rows were read from is no part of them (the API's npz is in a new folder per call)
    assert content_hash(digits) == content_hash(
        dataclasses.replace(digits, source="npz:/tmp/distill-x/rows.npz")
    )
    assert content_hash(History([1.0], [2.0])) != content_hash(History([1.0], [2.5]))
    with pytest.raises(TypeError, match=r"no content hash for builtins\.object"):
        content_hash(object())


def test_keys_differ_by_task_and_follow_the_stage_code(digits):
    teacher = build_mlp(64, [16], 10)
    cfg = ReduceConfig()
    key = _key(reduce_task, teacher=teacher, X_train=digits.X_train, cfg=cfg, seed=0)
    assert key == _key(
        reduce_task, teacher=copy.deepcopy(teacher), X_train=digits.X_train.copy(), cfg=cfg, seed=0
    )
    assert key != _key(reduce_task, teacher=teacher, X_train=digits.X_train, cfg=cfg, seed=1)
    assert key != _key(reconstruct_task, teacher=teacher, X_train=digits.X_train, cfg=cfg, seed=0)
    # the teacher's key covers the training loop it calls, not only the thin task wrapper,
    # and not the stages after it: editing quantization keeps a cached teacher
    teacher_code = set(code_modules(teacher_task.fn))
    assert {
        "distill.tasks.compress.teacher",
        "distill.tasks.compress.architectures",
        "distill.tasks.compress.weights",
        "distill.tasks.compress.finetune",
        "distill.tasks.compress.dataset",
        "distill.tasks.platform.config",
    } <= teacher_code
    assert (
        "distill.tasks.compress.quantize" not in teacher_code
        and "distill.tasks.compress.prune" not in teacher_code
    )
    assert "distill.tasks.compress.quantize" in code_modules(quantize_task.fn)
    assert "distill.tasks.compress.finetune" in code_modules(finetune_task.fn)


def test_a_teacher_file_is_keyed_by_its_bytes_and_an_alias_is_not_cached(tmp_path, digits):
    path = tmp_path / "teacher.pt"
    torch.save(build_mlp(64, [16], 10).state_dict(), path)
    before = teacher_source_fingerprint(f"file:{path}")
    torch.save(build_mlp(64, [16], 10).state_dict(), path)  # new random weights, same name
    assert teacher_source_fingerprint(f"file:{path}") != before
    assert teacher_source_fingerprint("models:/teacher/3") == "models:/teacher/3"
    with pytest.raises(Uncacheable):
        teacher_source_fingerprint("models:/teacher@champion")
    moving = TeacherConfig(source="models:/teacher@champion")
    assert _key(teacher_task, cfg=moving, data=digits, seed=0, device="cpu") is None
    assert _key(teacher_task, cfg=TeacherConfig(), data=digits, seed=0, device="cpu") is not None


def test_stage_results_survive_the_result_serializer(digits):
    """What persist_result writes (cloudpickle) reads back equal: module, Reduction, History."""
    teacher = build_mlp(64, [32], 10).eval()
    reduction = reduce_model(
        teacher, digits.X_train[:200], ReduceConfig(budget=BudgetConfig(ratio=2.0))
    )
    serializer = PickleSerializer()
    for value in (teacher, reduction, History([0.5], [0.4], [0.9], [1e-3], 0), digits):
        back = serializer.loads(serializer.dumps(value))
        assert type(back) is type(value) and content_hash(back) == content_hash(value)


def test_a_size_one_slice_with_any_stride_hashes_like_its_values():
    """A one-element tensor sliced out of a wider one keeps that tensor's stride and still counts
    as contiguous (a regression head's bias); its key is that of the same value made fresh."""
    sliced = torch.randn(47, 5)[:, :1].reshape(-1)[:1]
    assert sliced.stride() != (1,)
    assert content_hash(sliced) == content_hash(torch.tensor([sliced.item()]))


def test_a_target_search_is_keyed_by_what_it_holds(digits):
    """fit-target and smallest-target take one `Search`: keyed by its content (teacher weights,
    data, plan, costs, guard, stage settings), not by the object; an export stand-in (a function)
    has no key, and the task is not cached."""
    torch.manual_seed(0)
    teacher = build_mlp(64, [16], 10).eval()
    n = sum(p.numel() for p in teacher.parameters())
    costs = {"fp32": Costs((100, 10_100), (1_400, 41_400), (0.0052, 0.0252), "onnxruntime fp32")}
    plan = plan_target(TargetConfig(params=n // 2), costs, n, 100, 4 * n)
    guard = Guard(0.9, 0.01, digits.X_val, digits.y_val)
    cfg = PipelineConfig()
    search = Search(
        teacher,
        digits,
        plan,
        costs,
        guard,
        cfg.compress.prune,
        cfg.finetune,
        cfg.compress.quantize,
        0,
    )
    key = _key(fit_task, search=search, student=teacher, max_cut=1.0)
    assert key is not None
    search.calibration  # noqa: B018 -- a cached property is no part of the key
    twin = dataclasses.replace(
        search, teacher=copy.deepcopy(teacher), data=dataclasses.replace(digits)
    )
    assert _key(fit_task, search=twin, student=teacher, max_cut=1.0) == key
    assert _key(fit_task, search=search, student=teacher, max_cut=0.15) != key
    assert _key(smallest_task, search=search, student=teacher, builds=6) != key
    for changed in (
        {"prune": cfg.compress.prune.model_copy(update={"rounds": 7})},
        {"guard": dataclasses.replace(guard, max_drop=0.02)},
        {"seed": 1},
    ):
        other = dataclasses.replace(search, **changed)
        assert _key(fit_task, search=other, student=teacher, max_cut=1.0) != key, changed
    exported = dataclasses.replace(search, export=lambda m: None)
    assert _key(fit_task, search=exported, student=teacher, max_cut=1.0) is None
