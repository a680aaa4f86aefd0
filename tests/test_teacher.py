"""Teachers: which files load_teacher takes and refuses, building presets, weight-file identity, keypoint checks."""

import dataclasses
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdcache.errors import UserError
from kdcache.keypoints import COCO_17
from kdcache.teacher import (ARCHS, FAMILIES, build_teacher, load_teacher, require_keypoint_set,
                             teacher_from_checkpoint, teacher_weights_file)
from kdcache.vitpose import ARCHS as VITPOSE_ARCHS, ViTPose, build_vitpose, vitpose_config

FAMILY_API = ("KIND", "ARCHS", "build", "claims", "from_release", "claims_path", "from_path", "weights_file",
              "from_kdcache")


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_family_offers_the_family_api_under_its_kind(kind):
    family = FAMILIES[kind]
    assert family.KIND == kind and all(hasattr(family, name) for name in FAMILY_API)
    assert all(ARCHS[arch] is family for arch in family.ARCHS)


def test_archs_are_every_familys_presets():
    from kdcache.tokenpose import ARCHS as TOKENPOSE_ARCHS
    assert list(ARCHS) == list(VITPOSE_ARCHS) + list(TOKENPOSE_ARCHS)


@pytest.mark.parametrize("arch", ["vitpose-nano", "vitpose-tiny"])  # the presets small enough for a CPU test
@pytest.mark.parametrize("head", ["classic", "simple"])
def test_build_teacher_builds_the_preset_asked_for(arch, head):
    model = build_teacher(arch, head, (64, 48))
    assert isinstance(model, ViTPose) and model.config == vitpose_config(arch, head=head, input_hw=(64, 48))
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 48)).shape == (1, 17, 16, 12)


def test_build_teacher_refuses_an_unknown_arch():
    with pytest.raises(UserError, match=r"unknown teacher architecture 'vitpose-xl'; known: vitpose-s, vitpose-b"):
        build_teacher("vitpose-xl", "classic", (256, 192))


def test_load_teacher_reads_a_kdcache_checkpoint_at_its_size_or_another(nano_teacher):
    path = nano_teacher((64, 64))
    teacher = load_teacher(path)
    assert isinstance(teacher, ViTPose) and not teacher.training and teacher.config.input_hw == (64, 64)
    wider = load_teacher(path, input_hw=(64, 96))
    assert wider.config == dataclasses.replace(teacher.config, input_hw=(64, 96))
    with torch.no_grad():
        assert wider(torch.zeros(1, 3, 64, 96)).shape == (1, 17, 16, 24)


def test_a_kdcache_student_teaches_at_its_own_size_and_other_kinds_are_refused(nano_teacher, student_checkpoint,
                                                                             tmp_path):
    from kdcache.student import PoseStudent

    student, path = student_checkpoint("mobilenetv3_small_050", (64, 64))
    teacher = load_teacher(path)
    assert type(teacher) is PoseStudent and not teacher.training and teacher.config == student.config
    assert teacher.config.arch == "mobilenetv3_small_050" and teacher.codec == student.codec
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher(x), student(x))  # in eval mode: BN's running statistics, not the batch's
    assert load_teacher(path, input_hw=(64, 64)).config.input_hw == (64, 64)
    with pytest.raises(UserError, match=r"mobilenetv3_small_050\.pt is a kdcache student made for 64x64 crops and "
                                        r"cannot run at 128x96: use it at its own size"):
        load_teacher(path, input_hw=(128, 96))
    with pytest.raises(UserError, match=r"--expert picks a ViTPose\+\+ expert, but .*small_050\.pt is a kdcache "
                                        "student; drop --expert"):
        load_teacher(path, expert="aic")
    ckpt = torch.load(nano_teacher((64, 64)), weights_only=True)
    torch.save({**ckpt, "kind": "optimizer"}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"other\.pt is a kdcache 'optimizer' checkpoint, not a teacher "
                                        r"\(vitpose, tokenpose, student\)"):
        load_teacher(tmp_path / "other.pt")


@pytest.mark.parametrize("obj, message", [
    ({"epoch": 3, "optimizer": {}}, r"holds no teacher kdcache knows \(top-level keys \['epoch', 'optimizer'\]\)"),
    ({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, "holds no teacher kdcache knows"),
    ([torch.zeros(1)], "holds a list, not a checkpoint dict"),
])
def test_objects_without_teacher_weights_are_refused(obj, message, tmp_path):
    torch.save(obj, tmp_path / "other.pt")
    with pytest.raises(UserError, match=message):
        load_teacher(tmp_path / "other.pt")
    with pytest.raises(UserError, match=message):
        teacher_from_checkpoint(obj, Path("other.pt"))


def test_teacher_weights_file_of_a_file_and_of_a_huggingface_folder(tmp_path):
    (tmp_path / "vitpose.pth").write_bytes(b"x")
    assert teacher_weights_file(tmp_path / "vitpose.pth") == tmp_path / "vitpose.pth"
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    assert teacher_weights_file(folder) == folder / "model.safetensors"
    assert teacher_weights_file(folder / "model.safetensors") == folder / "model.safetensors"
    bin_folder = tmp_path / "hf-bin"
    bin_folder.mkdir()
    torch.save({"w": torch.zeros(1)}, bin_folder / "pytorch_model.bin")
    assert teacher_weights_file(bin_folder) == bin_folder / "pytorch_model.bin"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is a folder without ViTPose weights"):
        teacher_weights_file(tmp_path / "empty")


def test_require_keypoint_set_refuses_another_set_or_count_naming_both():
    """By the set the expert was trained on (AP-10K's 17 animal joints are not COCO's 17), else by the count."""
    from kdcache.keypoints import keypoint_set

    cfg = dataclasses.replace(vitpose_config("vitpose-nano", input_hw=(64, 48)), num_keypoints=14)
    aic = build_vitpose(cfg)
    with pytest.raises(UserError, match=r"--expert 'aic' of plus\.pth predicts AIC's keypoints, the annotation file "
                                        r"has COCO's"):
        require_keypoint_set(aic, COCO_17, Path("plus.pth"), "aic")
    with pytest.raises(UserError, match=r"plus\.pth \(expert None\) predicts 14 keypoints, not COCO's 17"):
        require_keypoint_set(aic, COCO_17, Path("plus.pth"), None)
    assert require_keypoint_set(aic, keypoint_set("aic-14"), Path("plus.pth"), 1) is None  # index 1 is AIC
    animal = types.SimpleNamespace(config=types.SimpleNamespace(num_keypoints=17))
    with pytest.raises(UserError, match=r"predicts AP-10K's keypoints, the annotation file has COCO's"):
        require_keypoint_set(animal, COCO_17, Path("plus.pth"), "apt36k")  # APT-36K: AP-10K's keypoints
    assert require_keypoint_set(animal, keypoint_set("ap10k-17"), Path("plus.pth"), "ap10k") is None
    coco = types.SimpleNamespace(config=types.SimpleNamespace(num_keypoints=17))
    assert require_keypoint_set(coco, COCO_17, Path("plus.pth"), None) is None
