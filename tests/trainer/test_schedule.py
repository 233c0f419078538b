"""The learning-rate schedules, as LambdaLR evaluates them."""

import pytest

from trainer.loop import lr_factor


@pytest.mark.parametrize("schedule", ["onecycle", "step"])
@pytest.mark.parametrize("epochs, steps_per_epoch", [(1, 1), (1, 2), (3, 1), (4, 50)])
def test_schedule_is_defined_at_every_step_of_tiny_and_normal_runs(
    schedule, epochs, steps_per_epoch
):
    config = {"epochs": epochs, "schedule": schedule, "warmup": 0.2, "lr_period": 4}
    config["lr_decay"] = 0.9
    factor = lr_factor(config, steps_per_epoch)
    # LambdaLR evaluates step 0 when built and once after every step: 0..total inclusive.
    values = [factor(step) for step in range(epochs * steps_per_epoch + 1)]
    assert all(0.0 <= value <= 1.0 for value in values), values


def test_onecycle_rises_to_the_peak_then_falls_to_zero():
    config = {"epochs": 4, "schedule": "onecycle", "warmup": 0.2, "lr_period": 4, "lr_decay": 0.9}
    factor = lr_factor(config, steps_per_epoch=50)  # 200 steps, the first 40 warming up
    values = [factor(step) for step in range(201)]
    assert values[0] == pytest.approx(1 / 40)
    assert values[19] == pytest.approx(0.5)
    assert values[39] == values[40] == pytest.approx(1.0)  # the peak: the full --lr
    assert values[120] == pytest.approx(0.5)
    assert values[200] == 0.0
    rising, falling = values[:40], values[40:]
    assert all(a < b for a, b in zip(rising, rising[1:], strict=False))
    assert all(a > b for a, b in zip(falling, falling[1:], strict=False))


def test_step_schedule_decays_every_period():
    config = {"epochs": 9, "schedule": "step", "warmup": 0.2, "lr_period": 2, "lr_decay": 0.5}
    factor = lr_factor(config, steps_per_epoch=10)
    per_epoch = [factor(epoch * 10) for epoch in range(9)]
    assert per_epoch == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625])
    assert factor(19) == 1.0 and factor(20) == 0.5  # the decay lands on the epoch boundary
