"""Training sources: which one a train-student config gets, the caches it refuses, and each source's loss."""

import pytest
import torch
from torch.utils.data import default_collate

from kdcache.augment import StudentAugConfig
from kdcache.cache import open_cache
from kdcache.config import RunConfig, TrainStudentConfig
from kdcache.data import CacheMix, CachedDataset, TrainViews
from kdcache.errors import UserError
from kdcache.inference import to_input_tensor
from kdcache.losses import KDConfig, distillation_loss, heatmap_mse
from kdcache.sources import CachedKD, GroundTruth, OnlineKD, check_cache_fits, student_source
from kdcache.student import StudentConfig
from kdcache.vitpose import ViTPose

INPUT_HW = (64, 64)


@pytest.fixture(scope="module")
def tiny(student_cache):
    """Six one-person images, a nano teacher, and its cache of 3 views per instance."""
    return student_cache()


def config(tiny, input_hw=INPUT_HW, num_keypoints=17, **kwargs) -> TrainStudentConfig:
    student = StudentConfig("mobilenetv3_small_100", input_hw=input_hw, num_keypoints=num_keypoints)
    return TrainStudentConfig(student=student, run=RunConfig(out=tiny["cache"].parent / "run", seed=5), **kwargs)


class Probe(torch.nn.Module):
    """[N, 3, H, W] -> [N, 17, H/4, W/4], recording its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 17, 4, stride=4)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return self.conv(x)


def batch_of(source, n=4) -> dict[str, torch.Tensor]:
    return default_collate([source.dataset[i] for i in range(n)])


def test_a_cache_gives_cached_kd(tiny):
    source = student_source(config(tiny, caches=(tiny["cache"],), flip_prob=0.25, train_views=1, kd=KDConfig(0.7)))
    assert type(source) is CachedKD and source.kd == KDConfig(0.7)
    mix = source.dataset
    assert type(mix) is CacheMix and len(mix) == 6 and mix.weights == [1.0]
    dataset = mix.datasets[0]
    assert type(dataset) is CachedDataset and len(dataset) == 6
    assert (dataset.flip_prob, dataset.seed, dataset.train_views) == (0.25, 5, 1)


def test_an_online_teacher_gives_online_kd_on_clean_crops(tiny):
    source = student_source(config(tiny, online_teacher=tiny["teacher"], ann=tiny["ann"], images=tiny["images"]))
    assert type(source) is OnlineKD and isinstance(source.teacher, ViTPose) and not source.teacher.training
    assert type(source.dataset) is TrainViews and source.dataset.keep_clean
    assert source.dataset.views.sampler.seed == 5  # no --view-seed: the run's seed


def test_neither_gives_ground_truth(tiny):
    source = student_source(config(tiny, ann=tiny["ann"], images=tiny["images"], view_seed=2, sigma=3.0))
    assert type(source) is GroundTruth and type(source.dataset) is TrainViews and not source.dataset.keep_clean
    sampler = source.dataset.views.sampler
    assert sampler.seed == 2 and sampler.codec.sigma == 3.0 and sampler.codec.input_hw == INPUT_HW
    with pytest.raises(UserError, match="training without --cache needs --ann and --images"):
        student_source(config(tiny, ann=tiny["ann"]))


@pytest.mark.parametrize("change, key", [({"input_hw": (128, 96)}, r"input_hw \[64, 64\] \(student: \[128, 96\]\)"),
                                         ({"sigma": 3.0}, r"sigma 2\.0 \(student: 3\.0\)")])
def test_a_cache_of_another_codec_is_refused_naming_the_key(tiny, change, key):
    cfg = config(tiny, caches=(tiny["cache"],), **change)
    message = rf"cache .*cache does not match the student: .*{key}.*; pass --input-size 64x64"
    with pytest.raises(UserError, match=message):
        check_cache_fits(open_cache(tiny["cache"]), cfg.student, cfg.sigma)
    with pytest.raises(UserError, match=message):
        student_source(cfg)
    assert check_cache_fits(open_cache(tiny["cache"]), config(tiny).student, 2.0) is None


def test_every_source_names_the_keypoint_set_and_codec_the_student_follows(tiny):
    """The student is built for its data (train_student takes both from the source), whatever it was asked for."""
    from kdcache.keypoints import COCO_17

    for source in (student_source(config(tiny, num_keypoints=14, caches=(tiny["cache"],))),
                   student_source(config(tiny, num_keypoints=14, ann=tiny["ann"], images=tiny["images"]))):
        assert source.keypoint_set is COCO_17 and source.codec.name == "udp-heatmap"


def test_an_online_teacher_of_another_crop_size_is_refused(tiny):
    with pytest.raises(UserError, match=r"teacher takes \(64, 64\) crops, student \(128, 96\)"):
        student_source(config(tiny, input_hw=(128, 96), online_teacher=tiny["teacher"], ann=tiny["ann"],
                              images=tiny["images"]))


def test_ground_truth_loss_is_heatmap_mse_on_the_students_crop(tiny):
    cfg = config(tiny, ann=tiny["ann"], images=tiny["images"], student_aug=StudentAugConfig(noise_prob=1.0))
    source, model = student_source(cfg), Probe()
    batch = batch_of(source)
    loss = source.loss(model, batch)
    with torch.no_grad():
        want = heatmap_mse(model.conv(to_input_tensor(batch["crop"])), batch["target"], batch["target_weight"])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and loss.item() > 0
    assert loss.requires_grad


def test_cached_kd_loss_is_the_distillation_loss_against_the_batchs_teacher_maps(tiny):
    kd = KDConfig(alpha=0.6, confidence_weights=True)
    source, model = student_source(config(tiny, caches=(tiny["cache"],), kd=kd)), Probe()
    cached = batch_of(source)
    # The nano teacher's maps are ~1e-6: maps of another scale show that the loss reads the batch's.
    gen = torch.Generator().manual_seed(0)
    other = {**cached, "teacher": torch.rand(cached["teacher"].shape, generator=gen),
             "teacher_confidence": torch.rand(cached["teacher_confidence"].shape, generator=gen)}
    losses = []
    for batch in (cached, other):
        loss = source.loss(model, batch)
        with torch.no_grad():
            want = distillation_loss(model.conv(to_input_tensor(batch["crop"])), batch["teacher"], batch["target"],
                                     batch["target_weight"], kd, batch["teacher_confidence"])
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        losses.append(loss.item())
    assert losses[0] != pytest.approx(losses[1])


def test_online_kd_feeds_the_teacher_the_clean_crop_and_the_student_the_changed_one(tiny):
    kd = KDConfig(alpha=0.5, confidence_weights=True)
    cfg = config(tiny, online_teacher=tiny["teacher"], ann=tiny["ann"], images=tiny["images"], kd=kd,
                 student_aug=StudentAugConfig(color_prob=1.0, noise_prob=1.0))
    source, model = student_source(cfg), Probe()
    with torch.no_grad():  # heatmaps of a trained teacher's scale (the nano teacher's are ~1e-6)
        source.teacher.keypoint_head.final_layer.weight.mul_(1e4)
    seen = []
    source.teacher.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    batch = batch_of(source)
    loss = source.loss(model, batch)
    clean, changed = to_input_tensor(batch["crop"]), to_input_tensor(batch["student_crop"])
    assert not torch.equal(clean, changed)
    assert len(seen) == 1 and torch.equal(seen[0], clean)
    assert len(model.inputs) == 1 and torch.equal(model.inputs[0], changed)

    def expected(teacher_input):
        with torch.no_grad():
            teacher = source.teacher(teacher_input)
            return distillation_loss(model.conv(changed), teacher, batch["target"], batch["target_weight"], kd,
                                     teacher.amax(dim=(2, 3))).item()

    assert loss.item() == pytest.approx(expected(clean), rel=1e-5)
    assert loss.item() != pytest.approx(expected(changed), rel=1e-3)

