"""Losses: mmpose's weighted MSE, the KL teacher term with temperature, alpha mixing, confidence weights."""

import pytest
import torch

from kdcache.errors import UserError
from kdcache.losses import KD_LOSSES, KDConfig, distillation_loss, heatmap_kl, heatmap_mse

torch.manual_seed(0)
PRED, TEACHER, TARGET = torch.rand(3, 17, 8, 6), torch.rand(3, 17, 8, 6), torch.rand(3, 17, 8, 6)
WEIGHT = torch.ones(3, 17)


def test_mse_is_half_mean_square_with_weights_on_the_difference():
    assert heatmap_mse(PRED, TARGET) == pytest.approx(0.5 * ((PRED - TARGET) ** 2).mean().item())
    w = torch.zeros(3, 17)
    w[:, 0] = 1
    assert heatmap_mse(PRED, TARGET, w) == pytest.approx(0.5 * ((PRED - TARGET)[:, 0] ** 2).sum().item() / PRED.numel())


def test_kl_is_zero_on_the_teacher_and_matches_the_definition():
    assert heatmap_kl(TEACHER, TEACHER) == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p = torch.softmax(PRED.reshape(3, 17, -1) / (t * 0.05), -1)
    q = torch.softmax(TEACHER.reshape(3, 17, -1) / (t * 0.05), -1)
    want = (q * (q.log() - p.log())).sum(-1).mean() * t * t
    assert heatmap_kl(PRED, TEACHER, temperature=t) == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("kind", list(KD_LOSSES))
def test_alpha_mixes_teacher_and_ground_truth(kind):
    kd = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(1.0, kind))
    gt = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(0.0, kind))
    assert gt == pytest.approx(heatmap_mse(PRED, TARGET, WEIGHT).item())
    assert distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(0.3, kind)) == pytest.approx(
        (0.3 * kd + 0.7 * gt).item(), rel=1e-6)


@pytest.mark.parametrize("kind", list(KD_LOSSES))
def test_confidence_weights_scale_each_joints_teacher_term_linearly(kind):
    weighted = KDConfig(1.0, kind, confidence_weights=True)

    def per_joint(k, w):
        conf = torch.zeros(3, 17)
        conf[:, k] = w
        return distillation_loss(PRED, TEACHER, TARGET, WEIGHT, weighted, conf).item()

    assert per_joint(4, 0.0) == 0.0
    assert per_joint(4, 0.5) == pytest.approx(0.5 * per_joint(4, 1.0), rel=1e-5)
    ones = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, weighted, torch.ones(3, 17)).item()
    assert ones == pytest.approx(distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(1.0, kind)).item(), rel=1e-6)
    # Without confidence_weights the confidence is not used.
    unweighted = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(1.0, kind), torch.zeros(3, 17)).item()
    assert unweighted == pytest.approx(ones, rel=1e-6)
    assert sum(per_joint(k, 1.0) for k in range(17)) == pytest.approx(ones, rel=1e-5)


def test_an_unknown_teacher_term_is_refused_by_name():
    with pytest.raises(UserError, match="unknown --kd-loss 'l1'; choose one of mse, kl"):
        KDConfig(loss="l1")


@pytest.mark.parametrize("kind", list(KD_LOSSES))
def test_ground_truth_term_is_the_mean_over_rows_with_ground_truth(kind):
    """Rows 0 and 2 labelled, row 1 from a box alone: the teacher term covers all three, ground truth the two."""
    labelled = torch.tensor([1.0, 0.0, 1.0])
    mixed = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(0.3, kind), labelled=labelled).item()
    kd = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(1.0, kind)).item()
    gt_rows = heatmap_mse(PRED[[0, 2]], TARGET[[0, 2]], WEIGHT[[0, 2]]).item()  # the mean over those rows only
    assert mixed == pytest.approx(0.3 * kd + 0.7 * gt_rows, rel=1e-6)
    all_labelled = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(0.3, kind), labelled=torch.ones(3))
    assert all_labelled.item() == pytest.approx(distillation_loss(PRED, TEACHER, TARGET, WEIGHT,
                                                                  KDConfig(0.3, kind)).item(), rel=1e-6)
    none = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(0.3, kind), labelled=torch.zeros(3))
    assert none.item() == pytest.approx(0.3 * kd, rel=1e-6)  # a batch of unlabelled rows: the teacher term only


@pytest.mark.parametrize("kind", list(KD_LOSSES))
def test_box_score_weights_scale_each_rows_teacher_term(kind):
    weighted = KDConfig(1.0, kind, box_score_weights=True)
    score = torch.tensor([0.0, 0.5, 0.0])
    only_row_1 = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, weighted, box_score=score).item()
    full = KD_LOSSES[kind](PRED[1:2], TEACHER[1:2], None, 1.0).item() / 3  # row 1's share of the mean over rows
    assert only_row_1 == pytest.approx(0.5 * full, rel=1e-5)
    conf = torch.rand(3, 17)  # both weights multiply
    both = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(1.0, kind, confidence_weights=True,
                                                                     box_score_weights=True), conf, box_score=score)
    alone = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(1.0, kind, confidence_weights=True),
                              conf * score[:, None])
    assert both.item() == pytest.approx(alone.item(), rel=1e-6)
    ignored = distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(1.0, kind), box_score=score).item()
    assert ignored == pytest.approx(distillation_loss(PRED, TEACHER, TARGET, WEIGHT, KDConfig(1.0, kind)).item())
