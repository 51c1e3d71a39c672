"""Fuller, fewer MLX micro-batches (`training.packing` on the MLX backend), and the compiled step.

An MLX micro-batch pays a fixed cost (graph building, kernel launches, the LoRA and optimizer
bookkeeping) whatever its length: on MLX's CUDA build at 7B a 60-token micro-batch took ~1 s
against 2.6 s for 4,096 tokens. With the M4 config's one example per micro-batch, a step of
short chat examples is mostly that fixed cost.

So the examples of one optimizer step are regrouped, longest first, into micro-batches of examples
that pad to the same width (PAD_TO buckets: no more padding than one example alone gets), each at
most as many padded input tokens as the run's largest ungrouped micro-batch (`batch_size` rows of its
longest example: `group_budget`): the same examples in the same optimizer step, in fewer passes, and
no micro-batch bigger in input tokens than one the run has to hold anyway (logits and activations
grow with a micro-batch's tokens, attention with rows x width^2, which is no larger either).
Measured at 7B on MLX's CUDA build on short examples (docs/benchmarks.md, 2026-11-28): grouped ran
1.40x ungrouped after the first step at a peak 0.07% higher (one round), and 1.1-1.4x mlx-lm's
trainer's rates at a peak within 0.5% of its (four rounds; MLX's buffer cache handed back after each
micro-batch, as mlx-lm's trainer does).
(Grouping by budget alone padded a step's short examples up to its longest: ~2x the compute on
the sample data, measured on the CPU.) The loss stays token-weighted and unchanged: the trainer
adds up summed losses and target counts over the step's micro-batches, and right padding is never
attended to (causal) nor scored (weight 0). Real packing (several examples in one row) would need
per-segment attention masks and position resets that mlx-lm's models do not take.

Rows are padded so that the model's input width is a multiple of PAD_TO, as mlx-lm's own trainer
does: `mx.compile` traces one graph per input shape, and this bounds the number of shapes.
"""

from __future__ import annotations

from common.data.tokenize import Example

PAD_TO = 32


def padded_width(length: int) -> int:
    """Row width whose model input (all but the last token) is a multiple of PAD_TO."""
    return 1 + PAD_TO * -(-(length - 1) // PAD_TO)


def group_budget(lengths: list[int], batch_size: int, max_seq_length: int) -> int:
    """Model input tokens (a row's padded width less its last token, which is only a target) that a
    grouped micro-batch may hold: those of the largest micro-batch the run has without grouping
    (`batch_size` rows of its longest example, capped at max_seq_length)."""
    longest = min(max(lengths, default=1), max_seq_length)
    return batch_size * (padded_width(longest) - 1)


def length_groups(examples: list[Example], token_budget: int) -> list[list[Example]]:
    """`examples` (one optimizer step's) as micro-batches of one padded width, longest first, each at
    most `token_budget` model input tokens (an example longer than that is a micro-batch of its own)."""
    groups: list[list[Example]] = []
    for example in sorted(examples, key=len, reverse=True):
        width = padded_width(len(example))
        if groups and padded_width(len(groups[-1][0])) == width and (len(groups[-1]) + 1) * (width - 1) <= token_budget:
            groups[-1].append(example)
        else:
            groups.append([example])
    return groups


def compiled_value_and_grad(model, value_and_grad):
    """`value_and_grad(model, ids, mask, ...)` compiled with `mx.compile` (as mlx-lm's trainer compiles
    its step): the model's weights and the random state (LoRA dropout) are the compiled function's
    inputs, so optimizer updates and per-micro-batch seeds reach it; one trace per input shape."""
    from functools import partial

    import mlx.core as mx

    state = [model.state, mx.random.state]  # outputs too: anything the trace leaves on the model

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*arrays):
        return value_and_grad(model, *arrays)

    return lambda _model, *arrays: step(*arrays)
