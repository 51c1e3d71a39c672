"""Preference tuning end to end on the tiny model, both backends, through the real trainers: DPO on
the sample pairs learns to rank the chosen answers first (rewards accuracy above chance on the
training pairs), evaluation on held-out pairs is logged, the PEFT adapter loads in PEFT, and a run
started from an SFT run's adapter starts from its weights with it as the reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import SAMPLE

pytest.importorskip("trl")
pytest.importorskip("bitsandbytes")

from backends import make_trainer  # noqa: E402
from common.config.loader import load_config  # noqa: E402
from common.console import Say  # noqa: E402
from common.data.preference import prepare_pairs  # noqa: E402
from common.data.prepare import prepare_data  # noqa: E402
from common.data.tokenize import ChatTokenizer  # noqa: E402
from common.run.folder import RunFolder  # noqa: E402

pytestmark = pytest.mark.slow
# the CPU here is slow and shared (MLX's CPU backend most of all): a few short pairs, a few steps
PAIRS = 8


def trainer_for(model_dir, out, name, backend, *extra, pairs=True):
    files = ("pairs_train.jsonl", "pairs_val.jsonl") if pairs else ("train.jsonl", "val.jsonl")
    cfg = load_config(platform="cpu", overrides=[
        f"backend={backend}", f"model.name_or_path={model_dir}", f"tracking.output_dir={out}",
        f"mlx.model_cache_dir={out / 'models'}", f"data.train_file={SAMPLE / files[0]}",
        f"data.val_file={SAMPLE / files[1]}", "tracking.report_to=none", "data.max_seq_length=128",
        "training.batch_size=4", "eval.eval_batch_size=8", *(["training.method=dpo"] if pairs else []), *extra])
    cfg.tracking.run_name = name
    data = (prepare_pairs if pairs else prepare_data)(cfg.data, ChatTokenizer())
    data.train, data.val = data.train[:PAIRS], data.val[:PAIRS]
    trainer = make_trainer(cfg, RunFolder.create(cfg), data, Say())
    trainer.setup()
    return trainer


def training_pair_accuracy(trainer) -> float:
    """Share of the training pairs whose chosen answer gets the higher reward, with the final weights."""
    if trainer.cfg.backend == "mlx":
        held_out, trainer.data.val = trainer.data.val, trainer.data.train
        trainer.evaluate()
        trainer.data.val = held_out
        return trainer.eval_stats["eval_rewards/accuracies"]
    from backends.cuda.preference import to_pair_dataset

    return trainer.trainer.evaluate(to_pair_dataset(trainer.data.train))["eval_rewards/accuracies"]


@pytest.fixture(scope="module", params=["cuda", "mlx"])
def trained(request, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"dpo-{request.param}")
    trainer = trainer_for(tiny_model_dir, out, "dpo", request.param, "training.max_steps=8", "eval.eval_steps=4",
                          "eval.save_steps=4", "eval.logging_steps=4", "training.learning_rate=2e-2",
                          "training.gradient_accumulation_steps=1", "training.warmup_ratio=0")
    summary = trainer.train()
    return trainer, summary


def test_dpo_ranks_the_chosen_answers_first(trained):
    trainer, summary = trained
    assert summary.global_step == 8
    assert training_pair_accuracy(trainer) > 0.5


def test_progress_and_held_out_evaluation_are_logged(trained):
    trainer, _ = trained
    records = trainer.run.read_metrics()
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert train and all({"rewards/accuracies", "rewards/margins", "rewards/chosen"} <= r.keys() for r in train)
    assert evals and all("eval_rewards/accuracies" in r and math.isfinite(r["eval_loss"]) for r in evals)


def test_the_adapter_loads_in_peft_and_moved(trained, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, _ = trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      str(trainer.run.root))
    ids = torch.tensor([trainer.data.train[0].side("chosen").input_ids])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert (tuned - base).abs().max() > 1e-3
    assert json.loads((trainer.run.root / "adapter_config.json").read_text())["r"] == trainer.cfg.lora.r


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    trainer = trainer_for(tiny_model_dir, out, "sft", "cuda", "training.max_steps=2", "training.learning_rate=2e-2",
                          "eval.eval_steps=2", "eval.save_steps=2", pairs=False)
    trainer.train()
    return trainer.run.root


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_starting_from_an_sft_run_uses_its_adapter_as_the_reference(sft_run, tiny_model_dir, tmp_path, backend):
    from common.adapters.conversion import read_peft

    start = trainer_for(tiny_model_dir, tmp_path, "from-sft", backend, f"preference.from_adapter={sft_run}")
    assert start.evaluate() == pytest.approx(math.log(2), abs=1e-4)  # policy == reference: every margin is 0
    start.save()
    assert not (start.run.root / "ref").exists()  # TRL's frozen copy of the start adapter is not exported
    saved, sft = read_peft(start.run.root), read_peft(sft_run)
    for key, b in sft.b.items():
        np.testing.assert_allclose(saved.b[key], b, atol=1e-6)
    assert any(np.abs(b).max() > 0 for b in sft.b.values())
    base = trainer_for(tiny_model_dir, tmp_path, "from-sft-base", backend, f"preference.from_adapter={sft_run}",
                       "preference.reference=base")
    assert abs(base.evaluate() - math.log(2)) > 1e-3  # the base as reference: the SFT adapter already moved


def weights_and_estimate(trainer) -> tuple[int, int]:
    """(bytes of the newest checkpoint's weights and optimizer state, the preflight's estimate of them)."""
    from common.plan.planner import lora_parameters, model_shape
    from common.run.checkpoints import estimated_bytes, holds_reference_copy

    cfg, folder = trainer.cfg, max(trainer.run.checkpoints.glob("checkpoint-*"), key=lambda f: int(f.name[11:]))
    saved = sum(f.stat().st_size for f in folder.rglob("*") if f.suffix in (".safetensors", ".pt"))
    lora = lora_parameters(cfg, model_shape(cfg))
    return saved, estimated_bytes(lora, lora if holds_reference_copy(cfg) else 0)


def test_a_checkpoint_is_the_size_the_disk_estimate_counts(trained):
    trainer, _ = trained
    saved, estimate = weights_and_estimate(trainer)
    assert not list(trainer.run.checkpoints.rglob("ref"))  # from a new adapter the reference is the base
    assert saved == pytest.approx(estimate, rel=0.1)


def test_a_checkpoint_from_a_start_adapter_holds_the_frozen_reference_and_the_estimate_counts_it(
        sft_run, tiny_model_dir, tmp_path):
    """CUDA: TRL's frozen copy of the start adapter is a second PEFT adapter, and transformers' checkpoints save
    every adapter (a `ref/` folder; resume reloads the reference from it). `qlora plan`/`check` counted the
    adapter and Adam's two moments only: a quarter short."""
    trainer = trainer_for(tiny_model_dir, tmp_path, "from-sft-ckpt", "cuda", f"preference.from_adapter={sft_run}",
                          "training.max_steps=1", "eval.eval_steps=1", "eval.save_steps=1")
    trainer.train()
    saved, estimate = weights_and_estimate(trainer)
    assert (trainer.run.checkpoints / "checkpoint-1" / "ref" / "adapter_model.safetensors").is_file()
    assert saved == pytest.approx(estimate, rel=0.1)


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_the_backends_refuse_a_start_adapter_of_another_base(tiny_model_dir, tmp_path, backend):
    """What a hub base not downloaded before the preflight meets: the backend reads the start adapter after
    loading the model and names the mismatch (it was PEFT's size-mismatch RuntimeError, mlx's matmul ValueError)."""
    from test_preference_data import write_start_adapter

    from common.errors import ConfigError

    wide = write_start_adapter(tmp_path / "wide", hidden=128, kv=64)
    with pytest.raises(ConfigError, match="layer 0 q_proj: adapter maps 128 -> 128 features but .* has 64 -> 64"):
        trainer_for(tiny_model_dir, tmp_path, "wide", backend, f"preference.from_adapter={wide}", "lora.r=8",
                    "lora.alpha=16", "lora.target_modules=[q_proj, v_proj]")


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_orpo_trains_and_logs_its_metrics(tiny_model_dir, tmp_path, backend):
    trainer = trainer_for(tiny_model_dir, tmp_path, "orpo", backend, "training.method=orpo", "training.max_steps=4",
                          "eval.eval_steps=4", "eval.save_steps=4", "eval.logging_steps=2", "training.learning_rate=2e-2")
    summary = trainer.train()
    records = trainer.run.read_metrics()
    train = [r for r in records if "loss" in r]
    assert summary.global_step == 4 and train[-1]["loss"] < train[0]["loss"]
    assert all(math.isfinite(r["rewards/margins"]) for r in train)
    assert any("eval_rewards/accuracies" in r for r in records)
    assert (trainer.run.root / "adapter_model.safetensors").is_file()


def test_dpo_keeps_the_chosen_checkpointed_layers_after_each_reference_pass(tiny_model_dir, tmp_path):
    """TRL's reference pass turns checkpointing off and on for the whole model; the policy's passes still
    checkpoint only the first cuda.checkpointed_layers layers, every step. Checkpoints hold no TRL stub card
    ("a fine-tuned version of [None]")."""
    import torch

    from backends.cuda.activation_checkpointing import decoder_layers

    trainer = trainer_for(tiny_model_dir, tmp_path, "limited", "cuda", "training.max_steps=3",
                          "training.gradient_checkpointing=true", "cuda.checkpointed_layers=1",
                          "eval.save_steps=3", "eval.eval_steps=3", "training.gradient_accumulation_steps=1")
    layers = decoder_layers(trainer.trainer.model)
    seen = []
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(
            lambda module, args, index=index: seen.append((index, bool(module.gradient_checkpointing)))
            if torch.is_grad_enabled() and module.training else None)
    trainer.train()
    assert len(layers) == 2 and len(seen) == 3 * 2  # 3 steps, 2 layers
    assert {flag for index, flag in seen if index == 0} == {True}
    assert {flag for index, flag in seen if index == 1} == {False}
    assert not any("fine-tuned version of" in card.read_text() for card in trainer.run.checkpoints.rglob("README.md"))


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_orpo_step_is_the_same_split_into_micro_batches(tiny_model_dir, tmp_path, backend):
    """ORPO's NLL term is over the step's chosen tokens and its odds term over the step's pairs, however the
    step is split: 4 pairs as 2 x 2 (accumulation) give the loss and the adapter of 4 x 1."""
    from safetensors.numpy import load_file

    def one_step(name, batch, accumulation):
        trainer = trainer_for(tiny_model_dir, tmp_path, name, backend, "training.method=orpo", "training.max_steps=1",
                              f"training.batch_size={batch}", f"training.gradient_accumulation_steps={accumulation}",
                              "eval.eval_steps=1", "eval.save_steps=1", "eval.logging_steps=1",
                              "training.learning_rate=2e-2", "training.warmup_ratio=0", "lora.dropout=0")
        trainer.train()
        loss = next(r["loss"] for r in trainer.run.read_metrics() if "loss" in r)
        return loss, load_file(str(trainer.run.root / "adapter_model.safetensors"))

    whole, split = one_step("whole", 4, 1), one_step("split", 2, 2)
    assert split[0] == pytest.approx(whole[0], rel=1e-4)
    assert whole[1].keys() == split[1].keys()
    # Adam's first step moves each weight by ~lr x the sign of its gradient: the few whose gradient is ~0 may
    # flip with the summation order (bf16 on the PyTorch path)
    same = np.concatenate([np.isclose(whole[1][k], split[1][k], rtol=0, atol=1e-4).ravel() for k in whole[1]])
    assert same.mean() > 0.99
