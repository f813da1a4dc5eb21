import fractions
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distill.tasks.compress.architectures import (
    INPUT,
    LOGITS,
    USER_ROOT,
    Logits,
    build_mlp,
    build_teacher,
    user_module,
    wrap_input,
)
from distill.tasks.compress.data import Dataset, prepare
from distill.tasks.compress.finetune import predict_logits
from distill.tasks.compress.sources import Table
from distill.tasks.compress.teacher import load_teacher
from distill.tasks.compress.weights import is_pt2_archive, pt2_pickled_record
from distill.tasks.platform.config import DataConfig, TeacherConfig, build_config
from distill.tasks.platform.errors import UserError
from tests import zoo


def test_state_dict_file_round_trip(tmp_path, digits):
    torch.manual_seed(0)
    model = build_mlp(64, [32], 10)
    torch.save(model.state_dict(), tmp_path / "t.pt")
    loaded = load_teacher(
        TeacherConfig(source=f"file:{tmp_path / 't.pt'}", hidden=[32]), digits, seed=0
    )
    assert (predict_logits(loaded, digits.X_test) == predict_logits(model, digits.X_test)).all()


def test_torchscript_file(tmp_path, digits):
    torch.manual_seed(0)
    model = build_mlp(64, [32], 10).eval()
    torch.jit.trace(model, torch.zeros(1, 64)).save(str(tmp_path / "t.ts"))
    loaded = load_teacher(
        TeacherConfig(source=f"file:{tmp_path / 't.ts'}", hidden=[32]), digits, seed=0
    )
    assert (predict_logits(loaded, digits.X_test) == predict_logits(model, digits.X_test)).all()


def test_wrong_architecture_names_the_tensor(tmp_path, digits):
    torch.save(build_mlp(64, [32], 10).state_dict(), tmp_path / "t.pt")
    with pytest.raises(UserError, match=r"0.weight has shape \[32, 64\].*expects \[48, 64\]"):
        load_teacher(TeacherConfig(source=f"file:{tmp_path / 't.pt'}", hidden=[48]), digits, seed=0)
    with pytest.raises(UserError, match=r"missing 4\.(weight|bias)"):
        load_teacher(
            TeacherConfig(source=f"file:{tmp_path / 't.pt'}", hidden=[32, 32]), digits, seed=0
        )


def test_pickled_module_is_refused(tmp_path, digits):
    torch.save(
        build_mlp(64, [32], 10), tmp_path / "evil.pt"
    )  # a whole pickled module: code on load
    with pytest.raises(UserError, match="neither a state_dict nor TorchScript"):
        load_teacher(TeacherConfig(source=f"file:{tmp_path / 'evil.pt'}"), digits, seed=0)


def test_missing_file_and_bad_source(tmp_path, digits):
    with pytest.raises(UserError, match="file not found"):
        load_teacher(TeacherConfig(source=f"file:{tmp_path / 'none.pt'}"), digits, seed=0)
    with pytest.raises(UserError, match="expected train, file:PATH"):
        load_teacher(TeacherConfig(source="hub:resnet"), digits, seed=0)


def test_missing_mlflow_model_is_a_user_error(mlflow_store, digits):
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_registry_uri(mlflow_store)
    with pytest.raises(UserError, match="cannot load models:/nope@champion"):
        load_teacher(TeacherConfig(source="models:/nope@champion"), digits, seed=0)


def test_file_without_tensors_is_refused(tmp_path, digits):
    torch.save({"epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="does not hold a state_dict"):
        load_teacher(TeacherConfig(source=f"file:{tmp_path / 'ckpt.pt'}"), digits, seed=0)


def test_trusted_pickle_is_loaded_with_a_warning(tmp_path, digits, capsys):
    torch.manual_seed(0)
    model = build_mlp(64, [32], 10).eval()
    torch.save(model, tmp_path / "whole.pt")
    loaded = load_teacher(
        TeacherConfig(source=f"file:{tmp_path / 'whole.pt'}", trust_pickle=True), digits, seed=0
    )
    assert (predict_logits(loaded, digits.X_test) == predict_logits(model, digits.X_test)).all()
    assert "trust_pickle is true" in capsys.readouterr().err


def test_a_pickle_of_distills_classes_from_before_one_package_loads(tmp_path, digits, monkeypatch):
    """A whole module saved when distill installed `tasks` at the top level names
    `tasks.compress.architectures.Logits`: it loads as `distill.tasks.compress.architectures`."""
    monkeypatch.setitem(sys.modules, "tasks", None)  # as installed: no top-level `tasks`
    torch.manual_seed(0)
    model = nn.Sequential(build_mlp(64, [32], 10), Logits()).eval()
    saved = io.BytesIO()
    torch.save(model, saved)
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(saved) as z, zipfile.ZipFile(old, "w") as out:
        for item in z.infolist():
            data = z.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"distill.tasks.compress.architectures" in data
                data = data.replace(b"distill.tasks.compress", b"tasks.compress")
            out.writestr(item, data)
    with pytest.raises(ModuleNotFoundError, match="'tasks'"):
        torch.load(old, weights_only=False)  # what plain unpickling does
    loaded = load_teacher(TeacherConfig(source=f"file:{old}", trust_pickle=True), digits, seed=0)
    assert type(loaded[-1]) is Logits
    assert (predict_logits(loaded, digits.X_test) == predict_logits(model, digits.X_test)).all()


# --- the user's own architecture (teacher.arch=module:Name) ---------------------------------

ZOO = "tests.zoo"


def random_data(shape: list[int], n_classes: int = 3, rows: int = 60, seed: int = 0) -> Dataset:
    """A small Dataset of the given `data.shape` (standardized normal rows, balanced classes)."""
    rng = np.random.default_rng(seed)
    n_features = int(np.prod(shape))
    X = rng.normal(size=(rows, n_features))
    y = np.arange(rows) % n_classes
    cfg = DataConfig(source="npz:random.npz", shape=shape)
    table = Table(
        X=X,
        y=y,
        names=[f"x{i}" for i in range(n_features)],
        name="random",
        where="random data",
        row_shape=(n_features,),
    )
    return prepare(table, cfg, seed)


def settled(model: nn.Module, shape: list[int]) -> nn.Module:
    """`model` in eval mode with batch-norm statistics that are not the defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape))
    return model.eval()


def user_logits(model: nn.Module, data: Dataset) -> np.ndarray:
    """What the user's own module gives for the test rows, fed `[N, *data.shape]`."""
    with torch.no_grad():
        return model(torch.from_numpy(data.X_test).reshape(-1, *data.input_shape)).numpy()


def test_config_accepts_builtins_and_import_paths_only():
    for arch in ("mlp", "cnn", "my_models:ResNet1d", "pkg.sub_mod:make_net", "_m:_N"):
        assert TeacherConfig(arch=arch).arch == arch
    cfg = build_config(
        {}, ["teacher.arch=my_models:ResNet1d", 'teacher.init_args={"channels": 32}']
    )
    assert cfg.teacher.init_args == {"channels": 32} and TeacherConfig().init_args == {}
    for arch in ("resnet", "my_models.ResNet1d", "my_models:", ":Net", "1mod:Net", "m:Net.x"):
        with pytest.raises(UserError, match=r"^config key 'teacher.arch': .*module:Name"):
            build_config({"teacher": {"arch": arch}})
    with pytest.raises(UserError, match=r"^config key 'teacher.init_args': .*JSON-like"):
        build_config({}, ["teacher.init_args={when: 2024-01-01}"])
    with pytest.raises(UserError, match=r"^config key 'teacher.init_args': .*valid dictionary"):
        build_config({}, ["teacher.init_args=[1, 2]"])


def test_wrap_input_and_user_module():
    inner = nn.Linear(4, 3)
    assert wrap_input(inner, (12,)) is inner and user_module(inner) is inner
    wrapped = wrap_input(inner, (3, 4))
    assert list(wrapped._modules) == [INPUT, USER_ROOT] and user_module(wrapped) is inner
    assert wrapped(torch.zeros(5, 12)).shape == (5, 3, 3)
    assert set(wrapped.state_dict()) == {f"{USER_ROOT}.weight", f"{USER_ROOT}.bias"}


def test_user_class_with_init_args_trains():
    data = random_data([1, 16])
    cfg = TeacherConfig(
        arch=f"{ZOO}:ResNet1d", init_args={"channels": 4, "n_classes": 3}, epochs=2, batch_size=16
    )
    model = load_teacher(cfg, data, seed=0)
    inner = user_module(model)
    assert isinstance(inner, zoo.ResNet1d) and model is not inner  # wrapped: [N, 1, 16] inputs
    assert inner.stem[0].out_channels == 4 and not model.training
    again = load_teacher(cfg, data, seed=0)  # deterministic for a seed
    assert (predict_logits(model, data.X_test) == predict_logits(again, data.X_test)).all()


def test_factory_function_loads_a_state_dict(tmp_path):
    data = random_data([1, 16])
    torch.manual_seed(1)
    saved = settled(zoo.make_resnet1d(channels=4, n_classes=3), [1, 16])
    torch.save(saved.state_dict(), tmp_path / "resnet.pt")
    cfg = TeacherConfig(
        arch=f"{ZOO}:make_resnet1d",
        init_args={"channels": 4, "n_classes": 3},
        source=f"file:{tmp_path / 'resnet.pt'}",
    )
    loaded = load_teacher(cfg, data, seed=0)
    assert (predict_logits(loaded, data.X_test) == user_logits(saved, data)).all()


def export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.export.save(torch.export.export(model, (example,)), str(path))
    return path


ZOO_CASES = [  # (name, init_args, data.shape)
    ("ResNet2d", {"channels": 4, "n_classes": 3}, [1, 8, 8]),
    ("ResNet1d", {"in_channels": 2, "channels": 4, "n_classes": 3}, [2, 16]),
    ("MobileNetBlockNet", {"channels": 4, "n_classes": 3}, [1, 8, 8]),
    (
        "TransformerClassifier",
        {
            "n_features": 6,
            "seq_len": 4,
            "d_model": 16,
            "n_heads": 2,
            "dim_feedforward": 32,
            "n_classes": 3,
        },
        [4, 6],
    ),
]


@pytest.mark.parametrize(("name", "init_args", "shape"), ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_zoo_state_dict_and_pt2_reproduce_logits(tmp_path, name, init_args, shape):
    data = random_data(shape)
    torch.manual_seed(2)
    saved = settled(getattr(zoo, name)(**init_args), shape)
    torch.save(saved.state_dict(), tmp_path / "t.pt")
    exported = export(saved, torch.zeros(2, *shape), tmp_path / "t.pt2")
    assert is_pt2_archive(exported) and pt2_pickled_record(exported) is None
    for path in (tmp_path / "t.pt", exported):
        cfg = TeacherConfig(arch=f"{ZOO}:{name}", init_args=init_args, source=f"file:{path}")
        loaded = load_teacher(cfg, data, seed=0)
        assert type(user_module(loaded)) is getattr(zoo, name)  # nn layers, not a graph
        assert (predict_logits(loaded, data.X_test) == user_logits(saved, data)).all()


def test_torchscript_and_wrapped_state_dicts_fit_the_user_module(tmp_path):
    data = random_data([1, 16])
    torch.manual_seed(3)
    saved = settled(zoo.ResNet1d(channels=4, n_classes=3), [1, 16])
    torch.jit.trace(saved, torch.zeros(1, 1, 16)).save(str(tmp_path / "t.ts"))
    torch.save(wrap_input(saved, (1, 16)).state_dict(), tmp_path / "wrapped.pt")  # model.* keys
    for file in ("t.ts", "wrapped.pt"):
        cfg = TeacherConfig(
            arch=f"{ZOO}:ResNet1d",
            init_args={"channels": 4, "n_classes": 3},
            source=f"file:{tmp_path / file}",
        )
        loaded = load_teacher(cfg, data, seed=0)
        assert (predict_logits(loaded, data.X_test) == user_logits(saved, data)).all()


def test_flat_shape_gets_no_wrapper(tmp_path):
    (tmp_path / "flat_models.py").write_text(
        "from torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, n_features=16, n_classes=3):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(),\n"
        "                                  nn.Linear(8, n_classes))\n\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    data = random_data([16])
    model = build_teacher(TeacherConfig(arch="flat_models:Net"), data, config_dir=tmp_path)
    assert type(model).__name__ == "Net" and user_module(model) is model


def test_module_is_imported_from_the_config_dir_and_cwd(tmp_path, monkeypatch):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "cfgdir_models.py").write_text(
        "from tests.zoo import ResNet1d\n\n"
        "def small(n_classes=3):\n"
        "    return ResNet1d(channels=4, n_classes=n_classes)\n"
    )
    data = random_data([1, 16])
    before = list(sys.path)
    cfg = TeacherConfig(arch="cfgdir_models:small")
    assert isinstance(user_module(build_teacher(cfg, data, config_dir=config_dir)), zoo.ResNet1d)
    assert sys.path == before
    with pytest.raises(
        UserError,
        match=r"^config key 'teacher.arch': cannot import module "
        r"'elsewhere_models' \(looked in .* and PYTHONPATH\)$",
    ):
        build_teacher(TeacherConfig(arch="elsewhere_models:Net"), data, config_dir=config_dir)
    assert sys.path == before

    work = tmp_path / "work"
    work.mkdir()
    (work / "cwd_models.py").write_text("from tests.zoo import ResNet1d as Net\n")
    monkeypatch.chdir(work)
    model = build_teacher(TeacherConfig(arch="cwd_models:Net", init_args={"n_classes": 3}), data)
    assert isinstance(user_module(model), zoo.ResNet1d) and sys.path == before


def test_bad_architectures_are_one_line_errors(tmp_path):
    (tmp_path / "bad_models.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "WIDTH = 3\n"
        "instance = nn.Linear(2, 2)\n\n"
        "def not_a_module(n_classes=3):\n"
        "    return {'weights': 1}\n\n"
        "class Picky(nn.Module):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__()\n"
        "        if width % 2:\n"
        "            raise ValueError('width must be even')\n"
        "        self.fc = nn.Linear(16, 3)\n"
    )
    (tmp_path / "needs_missing_dep.py").write_text("import no_such_dependency_xyz\n")
    data = random_data([1, 16])
    key = r"^config key 'teacher.arch': "
    cases = [
        (
            "bad_models:Missing",
            {},
            key + r"module 'bad_models' \(.*bad_models.py\) has no 'Missing'$",
        ),
        (
            "bad_models:WIDTH",
            {},
            key + r"bad_models:WIDTH is an object of type int, not a class or a function$",
        ),
        ("bad_models:instance", {}, key + r".* of type Linear, not a class or a function$"),
        (
            "bad_models:not_a_module",
            {},
            key + r"bad_models:not_a_module\(...\) returned a dict, not a torch.nn.Module$",
        ),
        (
            "bad_models:Picky",
            {"depth": 3},
            (
                r"^config key 'teacher.init_args': bad_models:Picky\(...\) rejected them: "
                r"got an unexpected keyword argument 'depth'$"
            ),
        ),
        (
            "bad_models:Picky",
            {"width": 3},
            key + r"bad_models:Picky\(...\) raised ValueError: width must be even$",
        ),
        (
            "needs_missing_dep:Net",
            {},
            key
            + (
                r"importing module 'needs_missing_dep' failed: "
                r"No module named 'no_such_dependency_xyz'$"
            ),
        ),
        (
            "no_such_models_xyz:Net",
            {},
            key + r"cannot import module 'no_such_models_xyz' \(looked in ",
        ),
    ]
    before = list(sys.path)
    for arch, init_args, message in cases:
        with pytest.raises(UserError, match=message) as info:
            load_teacher(
                TeacherConfig(arch=arch, init_args=init_args, epochs=1),
                data,
                seed=0,
                config_dir=tmp_path,
            )
        assert "\n" not in str(info.value)
    assert sys.path == before


def test_misfits_name_the_input_shape_and_output_width(tmp_path):
    data = random_data([1, 16])
    with pytest.raises(
        UserError,
        match=r"^teacher tests.zoo:ResNet2d does not accept inputs of "
        r"shape \[2, 1, 16\] \(data.shape=\[1, 16\]\): .*channels",
    ):
        load_teacher(
            TeacherConfig(arch=f"{ZOO}:ResNet2d", init_args={"n_classes": 3}), data, seed=0
        )
    with pytest.raises(
        UserError,
        match=r"^teacher tests.zoo:ResNet1d outputs \[10\] per row, "
        r"the data has 3 classes$",
    ):
        load_teacher(TeacherConfig(arch=f"{ZOO}:ResNet1d"), data, seed=0)


def test_state_dict_misfit_names_the_key_and_the_arch(tmp_path):
    data = random_data([1, 16])
    torch.save(zoo.ResNet1d(channels=8, n_classes=3).state_dict(), tmp_path / "t.pt")
    arch = f"{ZOO}:ResNet1d"
    with pytest.raises(
        UserError,
        match=rf"stem.0.weight has shape \[8, 1, 3\], "
        rf"teacher.arch={arch} expects \[4, 1, 3\]$",
    ):
        load_teacher(
            TeacherConfig(
                arch=arch,
                init_args={"channels": 4, "n_classes": 3},
                source=f"file:{tmp_path / 't.pt'}",
            ),
            data,
            seed=0,
        )
    with pytest.raises(
        UserError,
        match=rf"does not match teacher.arch={ZOO}:MobileNetBlockNet: "
        r"missing block\.",
    ):
        load_teacher(
            TeacherConfig(
                arch=f"{ZOO}:MobileNetBlockNet",
                init_args={"n_classes": 3},
                source=f"file:{tmp_path / 't.pt'}",
            ),
            data,
            seed=0,
        )


# --- torch.export programs (.pt2) -------------------------------------------------------------


def test_pt2_file_of_a_builtin_arch(tmp_path):
    data = random_data([1, 8, 8])
    torch.manual_seed(5)
    mlp = build_mlp(64, [32], 3).eval()  # exported as the pipeline holds it: flat rows
    path = export(mlp, torch.zeros(2, 64), tmp_path / "mlp.pt2")
    loaded = load_teacher(TeacherConfig(hidden=[32], source=f"file:{path}"), data, seed=0)
    assert (predict_logits(loaded, data.X_test) == predict_logits(mlp, data.X_test)).all()


def test_pt2_file_without_a_usable_arch_says_why(tmp_path):
    data = random_data([1, 8, 8])
    path = export(zoo.ResNet2d(n_classes=3).eval(), torch.zeros(2, 1, 8, 8), tmp_path / "r.pt2")
    message = (
        r"^teacher file .*r.pt2 \(a torch.export program\) does not match "
        r"teacher.arch=mlp: missing 0.bias; a torch.export program is a graph without nn "
        r"layers.*module:Name"
    )
    with pytest.raises(UserError, match=message) as info:
        load_teacher(TeacherConfig(source=f"file:{path}"), data, seed=0)
    assert "corrupted" not in str(info.value) and "\n" not in str(info.value)

    bare = tmp_path / "bare.pt2"  # the PT2 container, but no exported program in it
    with zipfile.ZipFile(bare, "w") as archive:
        archive.writestr("bare/archive_format", "pt2")
        archive.writestr("bare/archive_version", "0")
    with pytest.raises(
        UserError,
        match=r"^teacher file .*bare.pt2 is a PT2 archive without a "
        r"torch.export program",
    ):
        load_teacher(TeacherConfig(source=f"file:{bare}"), data, seed=0)


def test_pt2_file_with_a_pickled_record_is_refused(tmp_path):
    data = random_data([1, 8, 8])
    torch.manual_seed(6)
    saved = zoo.ResNet2d(channels=4, n_classes=3).eval()
    path = export(saved, torch.zeros(2, 1, 8, 8), tmp_path / "r.pt2")
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            content = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):  # a pickle beyond weights_only
                buffer = io.BytesIO()
                torch.save(fractions.Fraction(1, 3), buffer)
                content = buffer.getvalue()
            dst.writestr(info, content)
    cfg = TeacherConfig(
        arch=f"{ZOO}:ResNet2d", init_args={"channels": 4, "n_classes": 3}, source=f"file:{tampered}"
    )
    with pytest.raises(
        UserError,
        match=r"is a torch.export program whose record .*sample_inputs/"
        r"model.pt, a pickle: loading it runs code.*trust_pickle",
    ):
        load_teacher(cfg, data, seed=0)


# --- MLflow PyTorch models ------------------------------------------------------------------


def test_mlflow_pt2_model_loads_into_the_arch(mlflow_store):
    import mlflow
    import mlflow.pytorch

    data = random_data([1, 16])
    torch.manual_seed(7)
    saved = settled(zoo.ResNet1d(channels=4, n_classes=3), [1, 16])
    with mlflow.start_run() as run:  # MLflow 3's default format: pt2 (torch.export)
        info = mlflow.pytorch.log_model(
            saved,
            name="teacher",
            pip_requirements=["torch"],
            input_example=np.zeros((2, 1, 16), np.float32),
        )
    arch = {"arch": f"{ZOO}:ResNet1d", "init_args": {"channels": 4, "n_classes": 3}}
    for source in (info.model_uri, f"runs:/{run.info.run_id}/teacher"):
        loaded = load_teacher(TeacherConfig(source=source, **arch), data, seed=0)
        assert isinstance(user_module(loaded), zoo.ResNet1d)
        assert (predict_logits(loaded, data.X_test) == user_logits(saved, data)).all()
    with pytest.raises(
        UserError,
        match=rf"^MLflow model {info.model_uri} \(pt2 format, a "
        r"torch.export program\) does not match teacher.arch=mlp: "
        r"missing 0.bias; .*graph without nn layers",
    ):
        load_teacher(TeacherConfig(source=info.model_uri), data, seed=0)


def test_mlflow_pickle_model_loads_as_its_class(mlflow_store, digits):
    import mlflow
    import mlflow.pytorch

    torch.manual_seed(8)
    model = build_mlp(64, [16], 10).eval()
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model, name="teacher", serialization_format="pickle", pip_requirements=["torch"]
        )
    with pytest.raises(UserError, match=r"is a pickled MLflow PyTorch model; loading it runs code"):
        load_teacher(TeacherConfig(source=info.model_uri), digits, seed=0)
    loaded = load_teacher(TeacherConfig(source=info.model_uri, trust_pickle=True), digits, seed=0)
    assert (predict_logits(loaded, digits.X_test) == predict_logits(model, digits.X_test)).all()


class _Planted(torch.nn.Sequential):
    """A module whose unpickling runs a command (what a hostile logged teacher can do)."""

    marker = ""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_mlflow_pickle_teacher_runs_no_code_without_trust_pickle(mlflow_store, digits, tmp_path):
    import mlflow
    import mlflow.pytorch

    planted = _Planted(torch.nn.Linear(64, 10))
    planted.marker = str(tmp_path / "ran")
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(
            planted, name="teacher", serialization_format="pickle", pip_requirements=["torch"]
        )
    for source in (f"runs:/{run.info.run_id}/teacher",):
        with pytest.raises(UserError, match="pickled MLflow PyTorch model"):
            load_teacher(TeacherConfig(source=source), digits, seed=0)
    assert not (tmp_path / "ran").exists()


MULTI_OUTPUT = """
import torch
from torch import nn


class TupleNet(nn.Module):
    def __init__(self, n_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())
        self.head = nn.Linear(16, n_classes)

    def forward(self, x):
        hidden = self.body(x)
        return self.head(hidden), hidden


class DictNet(TupleNet):
    def forward(self, x):
        hidden = self.body(x)
        return {"hidden": hidden, "logits": self.head(hidden)}


class ListNet(TupleNet):
    def forward(self, x):
        return [None]
"""


@pytest.mark.parametrize("name", ["TupleNet", "DictNet"])
@pytest.mark.parametrize("shape", [[12], [2, 6]])
def test_a_module_answering_a_tuple_or_a_dict_is_taken_by_its_logits(name, shape, tmp_path):
    """Trained by distill or loaded from a file, a module answering more than a tensor gets a
    `logits` step: the pipeline sees its logits; its state_dict keys are the module's."""
    (tmp_path / "multi_out.py").write_text(MULTI_OUTPUT)
    data = random_data(shape)
    cfg = TeacherConfig(arch=f"multi_out:{name}", epochs=2, batch_size=16)
    model = load_teacher(cfg, data, seed=0, config_dir=tmp_path)
    assert list(model._modules)[-2:] == [USER_ROOT, LOGITS]
    assert type(user_module(model)).__name__ == name
    logits = predict_logits(model, data.X_test)
    assert logits.shape == (len(data.X_test), 3)
    torch.save(user_module(model).state_dict(), tmp_path / "t.pt")
    file_cfg = TeacherConfig(arch=f"multi_out:{name}", source=f"file:{tmp_path / 't.pt'}")
    loaded = load_teacher(file_cfg, data, seed=0, config_dir=tmp_path)
    assert np.array_equal(predict_logits(loaded, data.X_test), logits)
    with pytest.raises(
        UserError, match=r"^teacher multi_out:ListNet returns a list, not a tensor of logits$"
    ):
        load_teacher(TeacherConfig(arch="multi_out:ListNet"), data, seed=0, config_dir=tmp_path)


def test_an_unreadable_weights_file_is_one_line_and_no_library_warning(tmp_path):
    """A truncated pickle: torch.load warns about its protocol and advises weights_only=False;
    the user gets distill's line instead (what the file may be, and trust_pickle), no warning."""
    import pickle
    import warnings

    from distill.tasks.compress.weights import load_state_dict_file
    from distill.tasks.platform.errors import UserError

    path = tmp_path / "corrupt.pt"
    path.write_bytes(pickle.dumps("x")[:3])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as err:
            load_state_dict_file(path)
    # what Python shows a user by default (torch.jit.load's DeprecationWarning it does not)
    shown = [str(w.message) for w in seen if not issubclass(w.category, DeprecationWarning)]
    assert not shown, shown
    line = str(err.value)
    assert "cannot read it (Unsupported operand" in line and "teacher.trust_pickle: true" in line
    assert "weights_only` set to `False`" not in line and "\n" not in line
