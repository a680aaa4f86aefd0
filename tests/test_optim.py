"""The optimiser: AdamW, warm-up then the chosen decay, and the optional weight EMA."""

import pytest
import torch

from kdcache.config import OptimConfig
from kdcache.errors import UserError
from kdcache.optim import SCHEDULES, lr_factor, make_optimizer


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 100, 10) == pytest.approx(1e-3)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_drops_tenfold_twice():
    assert [lr_factor(s, 210, 5, "step") for s in (100, 169, 170, 199, 200, 209)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def rates(optim: OptimConfig, total: int) -> list[float]:
    """The learning rate of each of `total` steps."""
    model = torch.nn.Linear(2, 1)
    opt, sched, _ = make_optimizer(model, optim, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("warmup, total, expect", [(100, 20, 4), (3, 100, 3), (50, 3, 1)])
def test_warm_up_is_at_most_a_fifth_of_the_run(schedule, warmup, total, expect):
    got = rates(OptimConfig(lr=0.5, warmup_steps=warmup, schedule=schedule), total)
    assert got[0] == pytest.approx(0.5e-3)
    assert got.index(max(got)) == expect and max(got) == pytest.approx(0.5)  # the peak rate, reached
    assert got == pytest.approx([0.5 * lr_factor(s, total, expect, schedule) for s in range(total)])


def test_adamw_with_the_configured_rate_and_decay():
    model = torch.nn.Linear(2, 1)
    opt, _, _ = make_optimizer(model, OptimConfig(lr=0.2, weight_decay=0.05), 10)
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 0.2 and opt.defaults["weight_decay"] == 0.05
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(UserError, match="unknown schedule 'linear'; choose one of cosine, step"):
        make_optimizer(torch.nn.Linear(2, 1), OptimConfig(schedule="linear"), 10)


def test_ema_only_when_asked_and_it_averages_weights_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert make_optimizer(model, OptimConfig(ema=0.0), 10)[2] is None
    _, _, ema = make_optimizer(model, OptimConfig(ema=0.9), 10)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(1.0)
    ema.update_parameters(model)
    for key in ("0.weight", "0.bias", "1.running_mean"):
        want = 0.9 * first[key] + 0.1 * model.state_dict()[key]
        assert torch.allclose(ema.module.state_dict()[key], want), key
