"""backends/mlx/batching.py: a step's examples regrouped by length (training.packing on MLX)."""

from __future__ import annotations

from backends.mlx.batching import PAD_TO, group_budget, length_groups, padded_width
from common.data.tokenize import Example


def example(length: int, tag: int) -> Example:
    return Example(input_ids=[tag] * length, loss_mask=[1] * length)


def test_padded_width_makes_the_model_input_a_multiple_of_pad_to():
    assert [padded_width(n) for n in (2, 33, 34, 65, 4096)] == [33, 33, 65, 65, 4097]
    assert all((padded_width(n) - 1) % PAD_TO == 0 for n in range(2, 300))


def test_short_examples_share_micro_batches_within_the_token_budget():
    step = [example(n, i) for i, n in enumerate([60, 900, 45, 61, 3000, 50, 62, 40] * 2)]
    groups = length_groups(step, token_budget=4096)
    assert sorted(map(id, sum(groups, []))) == sorted(map(id, step))  # every example once
    assert all(len(g) * (padded_width(len(g[0])) - 1) <= 4096 for g in groups)
    assert all(len({padded_width(len(e)) for e in g}) == 1 for g in groups)  # no padding beyond PAD_TO
    assert len(groups) == 4  # 12 short examples in one pass, the two of 900 in one, each 3000 alone


def test_an_example_over_the_budget_runs_alone():
    long, short = example(5000, 1), example(10, 2)
    assert length_groups([short, long], token_budget=4096) == [[long], [short]]


def test_a_grouped_micro_batch_is_never_bigger_than_the_runs_largest_ungrouped_one():
    """Peak memory follows a micro-batch's model input tokens (logits are rows x input width x vocab;
    attention rows x width^2, smaller for more, shorter rows): grouping stays within the largest
    micro-batch the run holds without grouping (batch_size rows of its longest example)."""
    lengths = [60, 900, 45, 61, 3000, 50, 62, 40]
    assert group_budget(lengths, batch_size=1, max_seq_length=4096) == padded_width(3000) - 1
    assert group_budget(lengths, batch_size=2, max_seq_length=2048) == 2 * (padded_width(2048) - 1)
    short_data = [31, 20, 63, 28, 30]  # the sample data's regime: nothing near max_seq_length
    budget = group_budget(short_data, batch_size=1, max_seq_length=4096)
    assert budget == 64  # the 63-token example: 64 input positions after padding
    groups = length_groups([example(n, i) for i, n in enumerate(short_data * 4)], budget)
    assert all(len(g) * (padded_width(len(g[0])) - 1) <= budget for g in groups)
    # two rows of 32 input positions hold what one of 64 does: the short examples go in pairs
    assert max(len(g) for g in groups) == 2 and len(groups) == 12  # 16 short in 8 pairs, the 63s alone
