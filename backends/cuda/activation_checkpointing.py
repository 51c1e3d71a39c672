"""Activation checkpointing for the CUDA backend: on for every layer, or for the first N only.

transformers 5 checkpoints per decoder layer (each `GradientCheckpointingLayer` has its own flag)
and the Trainer switches every layer on when training starts; `every_n_layers` can only thin them
out evenly. `cuda.checkpointed_layers` asks for a count, so that exactly as many layers as the
memory budget needs recompute their activations (docs/benchmarks.md measures the trade).
"""

from __future__ import annotations


def checkpointing_args(enabled: bool) -> dict:
    """TrainingArguments for checkpointing. transformers 5.20+ renamed gradient checkpointing to
    activation checkpointing."""
    from transformers import TrainingArguments

    kwargs = {"use_reentrant": False}
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def limit_checkpointed_layers(model, count: int) -> tuple[int, int]:
    """Keep checkpointing on for the first `count` decoder layers only; the later ones keep their
    activations (they are also the first the backward pass frees). Returns (checkpointed, total)."""
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and index < count
    return sum(bool(layer.gradient_checkpointing) for layer in layers), len(layers)


def checkpoint_limit_callback(count: int, say):
    """A TrainerCallback applying `limit_checkpointed_layers` once the Trainer has switched
    checkpointing on (it does so at the start of every `train()`, resumes included)."""
    from transformers import TrainerCallback

    class LimitCheckpointing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            checkpointed, total = limit_checkpointed_layers(model, count)
            say.ok(f"activation checkpointing: {checkpointed} of {total} decoder layers "
                   f"(cuda.checkpointed_layers: {count}); the other {total - checkpointed} keep their activations")

    return LimitCheckpointing()


def keep_layer_choice_across_toggles(model) -> None:
    """TRL's DPO reference pass turns checkpointing off for the model and then on again
    (trl.models.utils.disable_gradient_checkpointing: gradient_checkpointing_disable, then _enable), which
    would switch every decoder layer on and undo cuda.checkpointed_layers from the first micro-batch on.
    On this model instance, an enable that follows a disable puts each layer back as it was before the
    disable; an enable without one (the Trainer's at the start of train()) works as before."""
    disable, enable = model.gradient_checkpointing_disable, model.gradient_checkpointing_enable
    before: list[list[bool]] = []

    def disabling(*args, **kwargs):
        before.append([bool(layer.gradient_checkpointing) for layer in decoder_layers(model)])
        return disable(*args, **kwargs)

    def enabling(*args, **kwargs):
        result = enable(*args, **kwargs)
        if before:
            for layer, was in zip(decoder_layers(model), before.pop()):
                layer.gradient_checkpointing = was
        return result

    model.gradient_checkpointing_disable, model.gradient_checkpointing_enable = disabling, enabling
