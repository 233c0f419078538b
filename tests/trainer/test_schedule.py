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
