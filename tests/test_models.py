"""Any model by path: students and teachers come back as what was saved, in eval mode."""

import types

import pytest
import torch

from kdcache.checkpoint import checkpoint_dict
from kdcache.errors import UserError
from kdcache.models import load_model, model_input_hw
from kdcache.student import PoseStudent, StudentConfig, build_student
from kdcache.vitpose import ViTPose, build_vitpose, vitpose_config

INPUT_HW = (64, 64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A student and a teacher, each run once in training mode (BN statistics move off init) and saved."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    models = {"student": build_student(StudentConfig("mobilenetv3_small_100", input_hw=INPUT_HW, head_channels=16)),
              "teacher": build_vitpose(vitpose_config("vitpose-nano", input_hw=INPUT_HW))}
    x = torch.randn(2, 3, *INPUT_HW)
    paths = {}
    for name, model in models.items():
        with torch.no_grad():
            model.train()(x)  # updates BN running statistics: eval mode must use them
        paths[name] = root / f"{name}.pt"
        torch.save(checkpoint_dict(model, epoch=1, step=1), paths[name])
    return models, paths, x


@pytest.mark.parametrize("name, kind", [("student", PoseStudent), ("teacher", ViTPose)])
def test_load_model_gives_the_saved_model_in_eval_mode(saved, name, kind):
    models, paths, x = saved
    loaded = load_model(paths[name])
    assert type(loaded) is kind and not loaded.training
    assert loaded.config == models[name].config
    with torch.no_grad():
        assert torch.equal(loaded(x), models[name].eval()(x))


def test_a_teacher_release_file_loads_too(saved, tmp_path):
    models, _, x = saved
    torch.save({"state_dict": models["teacher"].state_dict(), "meta": {"epoch": 210}}, tmp_path / "release.pth")
    loaded = load_model(tmp_path / "release.pth")
    assert type(loaded) is ViTPose and loaded.config.input_hw == INPUT_HW
    with torch.no_grad():
        assert torch.equal(loaded(x), models["teacher"].eval()(x))


def test_expert_on_a_student_is_refused(saved):
    path = saved[1]["student"]
    with pytest.raises(UserError, match=f"--expert picks a ViTPose\\+\\+ expert, but {path} is a kdcache student; "
                                        "drop --expert"):
        load_model(path, expert="aic")


def test_missing_and_unknown_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="missing.pt does not exist"):
        load_model(tmp_path / "missing.pt")
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="holds no teacher kdcache knows"):
        load_model(tmp_path / "other.pt")


def test_model_input_hw_of_a_model_and_of_a_wrapper(saved):
    student = saved[0]["student"]
    assert model_input_hw(student) == INPUT_HW
    assert model_input_hw(types.SimpleNamespace(module=student)) == INPUT_HW  # DDP holds it as .module
    teacher = types.SimpleNamespace(config=vitpose_config("vitpose-nano", input_hw=(128, 96)))
    assert model_input_hw(teacher) == (128, 96)
