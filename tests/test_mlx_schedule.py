"""The MLX backend rebuilds warmup + decay with mlx's schedules: at every optimizer step its learning
rate equals what transformers' scheduler gives the CUDA path for the same config."""

from __future__ import annotations

import pytest

from common.config.schema import TrainingConfig

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant_with_warmup"])
@pytest.mark.parametrize("total, warmup_ratio", [(63, 0.03), (10, 0.0), (120, 0.1), (1, 0.03)])
def test_mlx_learning_rate_equals_transformers_at_every_step(scheduler, total, warmup_ratio):
    from transformers import get_scheduler

    from backends.mlx.trainer import learning_rate_schedule

    t = TrainingConfig(lr_scheduler=scheduler, warmup_ratio=warmup_ratio, learning_rate=2e-4)
    ours = learning_rate_schedule(t, total)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    # TrainingArguments turns a warmup ratio into ceil(ratio x steps) warmup steps
    reference = get_scheduler(scheduler, optimizer, num_warmup_steps=-(-warmup_ratio * total // 1),
                              num_training_steps=total)
    for step in range(total):
        expected = optimizer.param_groups[0]["lr"]
        got = float(ours(step))
        # mlx computes in float32: equal to a millionth of the peak rate
        assert got == pytest.approx(expected, abs=t.learning_rate * 1e-6), (scheduler, step)
        optimizer.step()
        reference.step()
