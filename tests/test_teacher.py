import pytest
import torch

from tasks.config import TeacherConfig
from tasks.errors import UserError
from tasks.finetune import predict_logits
from tasks.teacher import build_mlp, load_teacher


def test_state_dict_file_round_trip(tmp_path, digits):
    torch.manual_seed(0)
    model = build_mlp(64, [32], 10)
    torch.save(model.state_dict(), tmp_path / "t.pt")
    loaded = load_teacher(TeacherConfig(source=f"file:{tmp_path / 't.pt'}", hidden=[32]), digits, seed=0)
    assert (predict_logits(loaded, digits.X_test) == predict_logits(model, digits.X_test)).all()


def test_torchscript_file(tmp_path, digits):
    torch.manual_seed(0)
    model = build_mlp(64, [32], 10).eval()
    torch.jit.trace(model, torch.zeros(1, 64)).save(str(tmp_path / "t.ts"))
    loaded = load_teacher(TeacherConfig(source=f"file:{tmp_path / 't.ts'}", hidden=[32]), digits, seed=0)
    assert (predict_logits(loaded, digits.X_test) == predict_logits(model, digits.X_test)).all()


def test_wrong_architecture_names_the_tensor(tmp_path, digits):
    torch.save(build_mlp(64, [32], 10).state_dict(), tmp_path / "t.pt")
    with pytest.raises(UserError, match=r"0.weight has shape \[32, 64\].*expects \[48, 64\]"):
        load_teacher(TeacherConfig(source=f"file:{tmp_path / 't.pt'}", hidden=[48]), digits, seed=0)
    with pytest.raises(UserError, match=r"missing 4\.(weight|bias)"):
        load_teacher(TeacherConfig(source=f"file:{tmp_path / 't.pt'}", hidden=[32, 32]), digits, seed=0)


def test_pickled_module_is_refused(tmp_path, digits):
    torch.save(build_mlp(64, [32], 10), tmp_path / "evil.pt")  # a whole pickled module: code on load
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
    loaded = load_teacher(TeacherConfig(source=f"file:{tmp_path / 'whole.pt'}", trust_pickle=True), digits, seed=0)
    assert (predict_logits(loaded, digits.X_test) == predict_logits(model, digits.X_test)).all()
    assert "trust_pickle is true" in capsys.readouterr().err
