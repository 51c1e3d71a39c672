"""The CUDA backend's real code path (bitsandbytes 4-bit + PEFT + TRL SFTTrainer) on a tiny
Mistral on the CPU: it learns, only LoRA weights move, the saved adapter reproduces the trainer's
logits, prompts carry no loss, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from conftest import SAMPLE, Recorder

pytest.importorskip("trl")
pytest.importorskip("bitsandbytes")

import torch  # noqa: E402

from backends.cuda import model as cuda_model  # noqa: E402
from backends.cuda.trainer import CudaTrainer  # noqa: E402
from common.config.loader import load_config  # noqa: E402
from common.console import Say  # noqa: E402
from common.data.prepare import prepare_data  # noqa: E402
from common.data.tokenize import ChatTokenizer
from common.errors import QLoraError  # noqa: E402
from common.run.checkpoints import problem  # noqa: E402
from common.run.folder import RunFolder  # noqa: E402

slow = pytest.mark.slow  # the tests that load or train the tiny model


def tiny_config(model_dir, out_dir, *extra):
    return load_config(
        platform="cpu",
        overrides=[
            f"model.name_or_path={model_dir}",
            f"tracking.output_dir={out_dir}",
            f"data.train_file={SAMPLE / 'train.jsonl'}",
            f"data.val_file={SAMPLE / 'val.jsonl'}",
            "tracking.report_to=none",
            *extra,
        ],
    )


def make_trainer(cfg, name):
    cfg.tracking.run_name = name
    data = prepare_data(cfg.data, ChatTokenizer())
    trainer = CudaTrainer(cfg, RunFolder.create(cfg), data, Say())
    trainer.setup()
    return trainer


def lora_state(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def frozen_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One packed run of the real path, shared by the assertions below."""
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(
        tiny_model_dir, out, "training.packing=true", "training.max_steps=60",
        "data.max_seq_length=256", "training.batch_size=2",
        "eval.eval_steps=20", "eval.save_steps=20", "eval.logging_steps=5",
    )
    trainer = make_trainer(cfg, "packed")
    before_lora, before_frozen = lora_state(trainer.trainer.model), frozen_state(trainer.trainer.model)
    summary = trainer.train()
    return trainer, summary, before_lora, before_frozen


@slow
def test_checkpointed_layers_beyond_the_loaded_models_layers_are_refused(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "training.gradient_checkpointing=true", "cuda.checkpointed_layers=3")
    with pytest.raises(QLoraError, match=r"(?s)cuda.checkpointed_layers is 3 but .* has 2 decoder layers.*1 to 2"):
        make_trainer(cfg, "too-many-layers")


@slow
def test_eval_loss_falls_clearly(trained):
    trainer, summary, _, _ = trained
    evals = [r["eval_loss"] for r in trainer.run.read_metrics() if "eval_loss" in r]
    assert len(evals) >= 3
    assert evals[-1] < evals[0] - 1.0, evals
    assert summary.global_step == 60 and summary.real_tokens > 0


@slow
def test_only_lora_weights_move(trained):
    trainer, _, before_lora, before_frozen = trained
    after_lora, after_frozen = lora_state(trainer.trainer.model), frozen_state(trainer.trainer.model)
    moved = [n for n in before_lora if not torch.equal(before_lora[n], after_lora[n])]
    assert len(moved) == len(before_lora) > 0  # every A and B trained
    for name, value in before_frozen.items():
        assert torch.equal(value, after_frozen[name]), f"frozen weight {name} changed"


@slow
def test_saved_adapter_reproduces_the_trainers_logits(trained):
    from peft import PeftModel

    trainer, _, _, _ = trained
    root = trainer.run.root
    config = json.loads((root / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == trainer.cfg.model.name_or_path
    assert config["r"] == 16 and config["lora_alpha"] == 32 and sorted(config["target_modules"]) == sorted(
        trainer.cfg.lora.target_modules
    )
    ids = torch.tensor([trainer.data.val[0].input_ids])
    own = trainer.trainer.model.eval()
    with torch.no_grad():
        expected = own(input_ids=ids).logits.float()
        base = cuda_model.load_quantized_model(trainer.cfg, "sdpa", "cpu")
        without_adapter = base(input_ids=ids).logits.float()
        got = PeftModel.from_pretrained(base, str(root)).eval()(input_ids=ids).logits.float()
    error = (got - expected).abs().max().item()
    effect = (without_adapter - expected).abs().max().item()
    # Logits are computed in bf16 (the reference configuration's compute dtype): a couple of bf16 steps of a logit is
    # rounding; an adapter that was not saved, or saved wrongly, misses by the whole effect.
    assert effect > 1.0
    assert error < 0.05 * effect, (error, effect)


@slow
def test_run_folder_holds_everything(trained):
    trainer, summary, _, _ = trained
    root = trainer.run.root
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl",
                 "loss.png", "summary.json"):
        assert (root / name).is_file(), name
    kept = list(root.joinpath("checkpoints").glob("checkpoint-*"))
    assert kept and all(problem(folder) is None for folder in kept)  # each one whole, with its manifest
    assert summary.best_checkpoint and summary.best_eval_loss is not None
    rates = [r["tokens_per_second"] for r in trainer.run.read_metrics() if "tokens_per_second" in r]
    assert rates and all(r > 0 for r in rates)


@slow
def test_prompt_tokens_carry_no_loss(trained):
    """The packed rows TRL trains on hold exactly our targets, and the collated batch keeps them."""
    trainer, _, _, _ = trained
    sft = trainer.trainer
    dataset = sft.train_dataset
    targets = sum(sum(1 for label in row["labels"] if label != -100) for row in dataset)
    assert targets == sum(e.n_targets for e in trainer.data.train)
    for row in dataset.select(range(3)):
        assert all(label in (-100, token) for label, token in zip(row["labels"], row["input_ids"]))
    batch = sft.data_collator([dataset[0], dataset[1]])
    expected = sum(sum(1 for label in dataset[i]["labels"] if label != -100) for i in (0, 1))
    assert int((batch["labels"] != -100).sum()) == expected
    assert "position_ids" in batch and "attention_mask" not in batch  # padding-free
    inst = {3, 4}  # [INST], [/INST]
    assert not inst & set(batch["labels"][batch["labels"] != -100].tolist())


@slow
def test_sigterm_saves_and_resume_ends_where_an_uninterrupted_run_ends(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    # No evaluation before the interruption: on the CPU, bitsandbytes repacks 4-bit weights for its
    # inference kernel at the first eval, which changes later training numerics slightly (CPU only).
    steps = ["training.max_steps=12", "eval.eval_steps=12", "eval.save_steps=4", "eval.logging_steps=2",
             "eval.load_best_model_at_end=false"]
    reference = make_trainer(tiny_config(tiny_model_dir, tmp_path, *steps), "straight")
    reference.train()
    expected = lora_state(reference.trainer.model)

    interrupted = make_trainer(tiny_config(tiny_model_dir, tmp_path, *steps), "resumable")
    initial = lora_state(interrupted.trainer.model)

    class Terminate(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    interrupted.trainer.add_callback(Terminate())
    write_optimizer = interrupted.trainer._save_optimizer_and_scheduler

    def second_signal_mid_save(output_dir):  # a second SIGTERM while the stop checkpoint is written
        if output_dir.endswith("checkpoint-7"):
            os.kill(os.getpid(), signal.SIGTERM)
        return write_optimizer(output_dir)

    interrupted.trainer._save_optimizer_and_scheduler = second_signal_mid_save
    write_adapter = interrupted.save

    def second_signal_mid_final_save():  # and one while the final adapter is written
        os.kill(os.getpid(), signal.SIGTERM)
        write_adapter()

    interrupted.save = second_signal_mid_final_save
    summary = interrupted.train()
    # the signal lands at the end of step 6; the step in flight (7) finishes, then it saves, whole
    assert summary.interrupted and summary.global_step == 7
    assert problem(interrupted.run.checkpoints / "checkpoint-7") is None
    assert (interrupted.run.root / "adapter_model.safetensors").is_file()

    resumed = make_trainer(tiny_config(tiny_model_dir, tmp_path, *steps), "resumable")
    summary = resumed.train(resume="auto")
    assert summary.resumed_from.endswith("checkpoint-7") and summary.global_step == 12
    got = lora_state(resumed.trainer.model)
    assert {p.dtype for n, p in resumed.trainer.model.named_parameters() if "lora_" in n} == {torch.float32}
    moved = max((initial[n] - expected[n]).abs().max().item() for n in expected)
    diff = max((got[n] - expected[n]).abs().max().item() for n in expected)
    assert moved > 1e-3 and diff < 1e-6, (diff, moved)


# ------------------------------------------------------------------ fallbacks


def test_attention_falls_back_to_sdpa_with_an_install_hint(monkeypatch):
    say = Recorder()
    monkeypatch.setattr(cuda_model, "installed_flash_kernels", lambda cap, say=None: [])
    assert cuda_model.choose_attention("auto", "cuda", (9, 0), say) == "sdpa"
    assert cuda_model.choose_attention("flash_attention_2", "cuda", (9, 0), say) == "sdpa"
    assert all(kind == "warn" and "FlashAttention" in text or "flash" in text for kind, text in say.lines)
    assert cuda_model.choose_attention("auto", "cpu", None, say) == "sdpa"


def _pretend_flash_installed(monkeypatch, broken=()):
    import types

    from transformers.utils import import_utils

    for name in ("is_flash_attn_4_available", "is_flash_attn_3_available", "is_flash_attn_2_available"):
        monkeypatch.setattr(import_utils, name, lambda: True)
    for module in ("flash_attn", "flash_attn.cute", "flash_attn_interface"):
        monkeypatch.setitem(sys.modules, module, None if module in broken else types.ModuleType(module))


def test_attention_picks_the_fastest_kernel_the_gpu_supports(monkeypatch):
    _pretend_flash_installed(monkeypatch)
    say = Recorder()
    assert cuda_model.choose_attention("auto", "cuda", (9, 0), say) == "flash_attention_4"
    assert cuda_model.choose_attention("auto", "cuda", (8, 0), say) == "flash_attention_2"  # A100: no FA3/FA4
    assert cuda_model.installed_flash_kernels((7, 5)) == []


def test_a_flash_kernel_that_does_not_load_is_skipped(monkeypatch):
    """flash-attn-4 without its native cutlass library passed transformers' probe and crashed the
    model load on the H100; now it is skipped with a warning."""
    _pretend_flash_installed(monkeypatch, broken=("flash_attn.cute", "flash_attn_interface"))
    say = Recorder()
    assert cuda_model.choose_attention("auto", "cuda", (9, 0), say) == "flash_attention_2"
    assert any("flash_attention_4 is installed but does not load" in text for _, text in say.lines)


def test_offline_hub_model_gives_an_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config("mistralai/Mistral-7B-Instruct-v0.3", tmp_path)
    cfg.cuda.attn_implementation = "sdpa"
    with pytest.raises(QLoraError, match="not in the local cache"):
        cuda_model.load_quantized_model(cfg, "sdpa", "cpu")


def test_local_model_loads_offline_and_incomplete_folder_is_named(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    assert cuda_model.model_source(cfg) == (str(tiny_model_dir), True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    cfg.model.name_or_path = str(broken)
    with pytest.raises(QLoraError, match=r"incomplete: missing weights"):
        cuda_model.model_source(cfg)


def test_gated_model_error_says_how_to_log_in():
    class GatedRepoError(OSError):
        pass

    err = cuda_model.explain_load_error("mistralai/Mistral-7B-Instruct-v0.3", GatedRepoError("401 Client Error"))
    assert "gated" in str(err) and "HF_TOKEN" in str(err)


def test_resume_auto_skips_a_checkpoint_cut_off_mid_save(tmp_path):
    """Our manifest comes last; a folder without it (or with a file it does not match) is never resumed."""
    from backends.cuda.sft_trainer import CHECKPOINT_FILES
    from common.run.checkpoints import write_manifest

    cfg = tiny_config("unused", tmp_path)
    cfg.tracking.run_name = "cut"
    run = RunFolder.create(cfg)
    good, broken = run.checkpoints / "checkpoint-100", run.checkpoints / "checkpoint-200"
    for folder in (good, broken):
        folder.mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            (folder / name).write_bytes(b"saved")
    write_manifest(good, 100, run.identity, CHECKPOINT_FILES)
    say = Recorder()
    assert CudaTrainer(cfg, run, None, say)._resume_point("auto") == str(good)
    assert any("checkpoint-200: no manifest.json: it was cut off while saving" in text for _, text in say.lines)
    assert (run.checkpoints / "broken-checkpoint-200").is_dir()  # out of the Trainer's way, kept
    (good / "scheduler.pt").unlink()  # a fresh schedule in silence is never an option
    with pytest.raises(QLoraError, match="none of the 1 checkpoint"):
        CudaTrainer(cfg, RunFolder.create(cfg), None, Recorder())._resume_point("auto")


@slow
def test_a_failing_checkpoint_write_keeps_the_earlier_ones_and_says_so(tiny_model_dir, tmp_path):
    import errno

    cfg = tiny_config(tiny_model_dir, tmp_path, "training.max_steps=4", "eval.eval_steps=2", "eval.save_steps=2",
                      "eval.load_best_model_at_end=false")
    trainer = make_trainer(cfg, "diskfull")
    real = trainer.trainer._save_optimizer_and_scheduler
    calls = []

    def full_disk(output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return real(output_dir)

    trainer.trainer._save_optimizer_and_scheduler = full_disk
    with pytest.raises(QLoraError, match=r"checkpoint of step 4 .*: No space left on device .*A checkpoint needs about "
                                         r".*partial folder was removed and the earlier checkpoint\(s\) checkpoint-2 are intact"):
        trainer.train()
    assert (trainer.run.checkpoints / "checkpoint-2" / "manifest.json").is_file()
    assert not (trainer.run.checkpoints / "checkpoint-4").exists()  # the partial folder is gone
    assert trainer._resume_point("auto").endswith("checkpoint-2")


# ---------------------------------------------------------------- speed levers (cuda.fused_lora, checkpointing)
def peft_tiny(tiny_model_dir, dropout=0.0, *extra):
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config(tiny_model_dir, "/tmp/unused", *extra)
    model = get_peft_model(
        cuda_model.load_quantized_model(cfg, "sdpa", "cpu"),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=list(cfg.lora.target_modules)),
    )
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:  # a trained-looking adapter: B = 0 would hide every LoRA difference
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return model


def loss_and_lora_grads(model, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for n, p in model.named_parameters() if "lora_" in n])


@slow
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast-bf16", "no-autocast"])
def test_fused_lora_computes_what_peft_computes(tiny_model_dir, autocast):
    from backends.cuda.fused_lora import install_fused_lora

    model = peft_tiny(tiny_model_dir)
    ids = torch.randint(0, 32768, (2, 48), generator=torch.Generator().manual_seed(1))
    peft_loss, peft_grads = loss_and_lora_grads(model, ids, autocast)
    assert install_fused_lora(model) == 7 * 2  # 7 projections x 2 layers
    fused_loss, fused_grads = loss_and_lora_grads(model, ids, autocast)
    assert fused_loss == pytest.approx(peft_loss, rel=2**-8)  # bf16 rounding, not a different sum
    assert torch.nn.functional.cosine_similarity(peft_grads, fused_grads, dim=0) > 0.999
    assert (fused_grads.norm() / peft_grads.norm()).item() == pytest.approx(1, abs=0.01)


@slow
def test_fused_lora_keeps_an_fp32_models_dtypes_under_bf16_autocast(tiny_model_dir):
    """cuda.quantization.compute_dtype float32 with bf16 autocast: the fused path returns what PEFT
    returns (fp32) and its backward runs (the base gradient in fp32, the LoRA path in bf16)."""
    from backends.cuda.fused_lora import install_fused_lora

    model = peft_tiny(tiny_model_dir, 0.0, "cuda.quantization.compute_dtype=float32")
    ids = torch.randint(0, 32768, (2, 48), generator=torch.Generator().manual_seed(4))
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    x = torch.randn(2, 8, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_out = layer(x)
    peft_loss, peft_grads = loss_and_lora_grads(model, ids, autocast=True)
    install_fused_lora(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == peft_out.dtype == torch.float32
        with torch.no_grad():
            assert layer(x).dtype == torch.float32
    fused_loss, fused_grads = loss_and_lora_grads(model, ids, autocast=True)
    assert fused_loss == pytest.approx(peft_loss, rel=2**-8)
    assert torch.nn.functional.cosine_similarity(peft_grads, fused_grads, dim=0) > 0.999


def one_lora_layer(tiny_model_dir, dropout):
    """The first 4-bit LoRA projection (q_proj) of the tiny model, fused, and an input that needs a gradient."""
    from backends.cuda.fused_lora import install_fused_lora

    model = peft_tiny(tiny_model_dir, dropout=dropout)
    install_fused_lora(model)
    model.train()
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    x = torch.randn(2, 24, layer.in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    return layer, x.requires_grad_()


def fused_step(layer, x, seed, replay):
    from backends.cuda.fused_lora import REPLAY_ATTRIBUTE

    setattr(layer, REPLAY_ATTRIBUTE, replay)
    for param in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        param.grad = None
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().mean().backward()
    after = torch.rand(4)  # where the random stream stands after forward and backward
    return out.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad, after


@slow
@pytest.mark.parametrize("replay", [False, True], ids=["mask-stored", "mask-replayed"])
def test_fused_lora_with_dropout_computes_the_masked_update_and_its_gradients(tiny_model_dir, replay):
    """Forward and backward of the fused function against plain autograd on the same dropout mask:
    base(x) + scaling * B A (x * mask / (1 - p)), with the base weight dequantized. A replayed mask is
    the forward's own, and the random stream moves on exactly as with a stored one."""
    from bitsandbytes.functional import dequantize_4bit

    p = 0.3  # a large p: a wrong mask in the backward could not hide
    layer, x = one_lora_layer(tiny_model_dir, p)
    out, grad_x, grad_a, grad_b, after = fused_step(layer, x, seed=7, replay=replay)
    torch.manual_seed(7)
    _, mask = torch.native_dropout(x.detach(), p, True)  # the mask the forward drew
    weight = layer.base_layer.weight
    base = dequantize_4bit(weight.data.view(-1, 1), weight.quant_state).to(torch.bfloat16)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = x_ref @ base.t() + layer.scaling["default"] * ((x_ref * mask / (1 - p)) @ a.t() @ b.t())
    ref.float().square().mean().backward()
    assert torch.allclose(out.float(), ref.detach().float(), rtol=2**-6, atol=2**-6)
    for mine, theirs in ((grad_x, x_ref.grad), (grad_a, a.grad), (grad_b, b.grad)):
        assert torch.nn.functional.cosine_similarity(mine.flatten().float(), theirs.flatten().float(), dim=0) > 0.999
        assert (mine.float().norm() / theirs.float().norm()).item() == pytest.approx(1, abs=0.01)
    stored = fused_step(layer, x, seed=7, replay=not replay)
    for mine, theirs in zip((out, grad_x, grad_a, grad_b, after), stored):  # replay changes memory, not numbers
        assert torch.equal(mine, theirs)


@slow
def test_replayed_dropout_masks_are_not_stored(tiny_model_dir):
    """What the backward pass keeps of a decoder layer that keeps its activations: with the masks
    replayed, LoRA dropout costs no activation memory at all (the same bytes as dropout 0)."""
    from backends.cuda.fused_lora import REPLAY_ATTRIBUTE

    def saved_bytes(dropout, replay):
        model = peft_tiny(tiny_model_dir, dropout=dropout)
        from backends.cuda.fused_lora import install_fused_lora

        install_fused_lora(model)
        model.train()
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
        for module in layer.modules():
            setattr(module, REPLAY_ATTRIBUTE, replay)
        x = torch.randn(1, 64, 64, dtype=torch.bfloat16, requires_grad=True)
        position = torch.arange(64)[None]
        storages = {}

        def keep(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x, position_embeddings=model.base_model.model.model.rotary_emb(x, position), position_ids=position)
        return sum(storages.values())

    stored, replayed, no_dropout = saved_bytes(0.1, False), saved_bytes(0.1, True), saved_bytes(0.0, False)
    assert replayed == no_dropout
    # stored, each of the 7 projections keeps its dropped-out input (bf16) and mask (bool): 3 bytes a
    # feature, less the plain inputs that the replay keeps instead (q/k/v share one, gate/up one)
    assert stored - replayed >= 64 * 2 * (6 * 64 + 128)


@slow
def test_replayed_dropout_trains_the_same_weights(tiny_model_dir, tmp_path):
    """The trainer replays masks in the layers that keep their activations (here the second of two) and
    stores them in the checkpointed ones; the run's weights equal those of a run that stores them all."""
    from backends.cuda.fused_lora import REPLAY_ATTRIBUTE

    runs = {}
    for replay in (False, True):
        cfg = tiny_config(tiny_model_dir, tmp_path, "training.max_steps=3", "eval.eval_steps=100",
                          "eval.save_steps=100", "eval.load_best_model_at_end=false", "cuda.checkpointed_layers=1",
                          "lora.dropout=0.2", f"cuda.replay_dropout={str(replay).lower()}")
        trainer = make_trainer(cfg, f"replay-{replay}")
        trainer.train()
        flags = {getattr(m, REPLAY_ATTRIBUTE, False) for n, m in trainer.trainer.model.named_modules()
                 if n.endswith("layers.1.mlp.down_proj")}
        first = {getattr(m, REPLAY_ATTRIBUTE, False) for n, m in trainer.trainer.model.named_modules()
                 if n.endswith("layers.0.mlp.down_proj")}
        runs[replay] = flags, first, lora_state(trainer.trainer.model)
    assert runs[True][:2] == ({True}, {False})  # the kept layer replays, the checkpointed one stores
    assert runs[False][:2] == ({False}, {False})
    for name, weight in runs[False][2].items():
        assert torch.equal(weight, runs[True][2][name]), name


@slow
@pytest.mark.parametrize("fused", [False, True], ids=["peft", "fused"])
def test_an_evaluation_leaves_the_next_training_steps_gradients_alone(tiny_model_dir, fused):
    """On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights during a no-gradient eval pass
    and then passes no input gradient through them; our CPU training models never repack."""
    from backends.cuda.fused_lora import install_fused_lora

    model = peft_tiny(tiny_model_dir)
    if fused:
        install_fused_lora(model)
    ids = torch.randint(0, 32768, (2, 48), generator=torch.Generator().manual_seed(1))
    model.train()
    loss, grads = loss_and_lora_grads(model, ids, autocast=True)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # an evaluation
    model.train()
    after_loss, after_grads = loss_and_lora_grads(model, ids, autocast=True)
    assert after_loss == pytest.approx(loss, rel=1e-6)
    assert torch.nn.functional.cosine_similarity(grads, after_grads, dim=0) > 0.9999
    assert (after_grads.norm() / grads.norm()).item() == pytest.approx(1, abs=1e-4)


@slow
def test_fused_lora_leaves_disabled_adapters_to_peft(tiny_model_dir):
    from backends.cuda.fused_lora import install_fused_lora

    model = peft_tiny(tiny_model_dir)
    install_fused_lora(model)
    ids = torch.randint(0, 32768, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(with_adapter, base)  # the adapter is on in the fused path...
    with torch.no_grad(), model.disable_adapter():  # ...and off means off (PEFT's own forward)
        assert torch.equal(model(input_ids=ids).logits, base)


@slow
def test_fewer_checkpointed_layers_train_the_same_weights(tiny_model_dir, tmp_path):
    from backends.cuda.activation_checkpointing import decoder_layers

    runs = {}
    for layers in ("all", "1"):
        cfg = tiny_config(tiny_model_dir, tmp_path, "training.max_steps=4", "eval.eval_steps=100",
                          "eval.save_steps=100", "eval.load_best_model_at_end=false",
                          f"cuda.checkpointed_layers={layers}", "lora.dropout=0")
        trainer = make_trainer(cfg, f"ckpt-{layers}")
        trainer.train()
        flags = [layer.gradient_checkpointing for layer in decoder_layers(trainer.trainer.model)]
        runs[layers] = flags, lora_state(trainer.trainer.model)
    assert runs["all"][0] == [True, True]
    assert runs["1"][0] == [True, False]  # the first layer recomputes, the last keeps its activations
    for name, weight in runs["all"][1].items():  # checkpointing changes memory, never the math
        assert torch.allclose(weight, runs["1"][1][name], atol=1e-6), name


@slow
def test_chosen_liger_kernels_reach_the_trainer(tiny_model_dir, tmp_path):
    """transformers hands `liger_kernel_config` to Liger, which silently drops unknown names: the
    config's kernel names must be Liger's own, the ones left out switched off, and Liger's fused
    linear cross-entropy off (TRL's SFTTrainer refuses it: its own chunked LM head computes the loss)."""
    cfg = tiny_config(tiny_model_dir, tmp_path, "training.max_steps=1",
                      "cuda.liger_kernels=[rope,swiglu]")
    trainer = make_trainer(cfg, "liger-choice")
    assert trainer.trainer.args.liger_kernel_config == {
        "rope": True, "rms_norm": False, "swiglu": True, "fused_linear_cross_entropy": False, "cross_entropy": False,
    }
    try:
        from liger_kernel.transformers.monkey_patch import apply_liger_kernel_to_mistral
    except ImportError:  # no Liger on this machine (CPU): the names are checked on the GPU bench
        return
    import inspect

    assert set(trainer.trainer.args.liger_kernel_config) <= set(inspect.signature(apply_liger_kernel_to_mistral).parameters)


def test_liger_rope_is_routed_to_its_triton_kernel_for_the_run_only(monkeypatch):
    """Liger's CuTe DSL RoPE recompiles for each new packed-batch length (-23% tokens/s measured on the
    H100); its Triton kernel compiles once. The backend picks Triton through Liger's per-op variable,
    which Liger's dispatcher reads at each call, for the run only, and leaves a user's own choice alone."""
    from backends.cuda.patches import liger_rope_impl, run_scope

    for var in ("LIGER_KERNEL_IMPL_ROPE", "LIGER_KERNEL_BACKEND_ROPE"):
        monkeypatch.delenv(var, raising=False)
    with run_scope(["rms_norm", "swiglu"]):
        assert "LIGER_KERNEL_IMPL_ROPE" not in os.environ  # no RoPE: nothing routed
    with run_scope(["rope", "rms_norm"]):
        assert os.environ["LIGER_KERNEL_IMPL_ROPE"] == "nvidia-triton" == liger_rope_impl(["rope"])
    assert "LIGER_KERNEL_IMPL_ROPE" not in os.environ  # gone when the run ends
    monkeypatch.setenv("LIGER_KERNEL_BACKEND_ROPE", "cutedsl")  # the user's choice, by Liger's legacy name
    with run_scope(["rope"]):
        assert liger_rope_impl(["rope"]) == "cutedsl" and "LIGER_KERNEL_IMPL_ROPE" not in os.environ
    assert os.environ["LIGER_KERNEL_BACKEND_ROPE"] == "cutedsl"


def test_each_process_puts_its_own_gpu_back_before_a_layer_runs(tiny_model_dir, monkeypatch):
    """--gpus N: a library that leaves the current CUDA device elsewhere would send Liger's Triton RoPE
    (no device guard) to the wrong GPU, as on two H100s (2026-11-27). Before each decoder layer and
    norm, the process's GPU is made current again, said once, naming where. (CPU: the CUDA calls are
    recorded, the layers run on the CPU.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from backends.cuda.patches import pin_cuda_device

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    current, calls, said = [0], [], []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: (calls.append(index), current.__setitem__(0, index)))
    say = type("Say", (), {"info": lambda self, text: said.append(text)})()
    layers = model.config.num_hidden_layers
    assert pin_cuda_device(model, 1, say) == layers + 2 * layers + 1  # layers, their 2 norms, the final norm
    current[0] = 0  # something switched it
    model(torch.tensor([[1, 2, 3]]))
    assert calls == [1] and current[0] == 1  # put back once, before the first layer
    assert len(said) == 1 and "was 0 instead of this process's GPU 1 before model.layers.0" in said[0]
    assert "harmless" in said[0]
    current[0] = 0
    model(torch.tensor([[1, 2, 3]]))
    assert calls == [1, 1] and len(said) == 1  # again put back, said only once


def test_only_liger_ascend_import_notices_are_dropped_during_the_run(caplog):
    """On CUDA, Liger logs that its Huawei Ascend RoPE failed to import, mid-run, worded like an error;
    the backend drops that notice and no other, and only while a run lasts."""
    import logging

    from backends.cuda.patches import LIGER_REGISTRY_LOGGER, run_scope

    log = logging.getLogger(LIGER_REGISTRY_LOGGER)
    notice = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
    with caplog.at_level(logging.WARNING, logger=LIGER_REGISTRY_LOGGER), run_scope(["rms_norm"]):
        assert len(log.filters) == 1
        log.warning(notice, "liger_kernel.ops.backends._ascend.rope", "rope", "ImportError", "no tanh")
        log.warning(notice, "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError", "no cutlass")
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 1 and "_cutedsl" in shown[0]
    assert not log.filters  # the run is over: the logger is as it was


@slow
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_async_metrics_train_and_log_what_trl_does(tiny_model_dir, tmp_path, packing):
    """cuda.async_metrics keeps TRL's per-micro-batch metrics on the device: the same weights after
    training, and the same logged loss, entropy, token accuracy and token counts as TRL's own steps."""
    runs = {}
    for deferred in (False, True):
        cfg = tiny_config(tiny_model_dir, tmp_path, "training.max_steps=6", "eval.eval_steps=3",
                          "eval.save_steps=3", "eval.logging_steps=2", f"training.packing={str(packing).lower()}",
                          "data.max_seq_length=256", "training.gradient_accumulation_steps=2",
                          "lora.dropout=0", f"cuda.async_metrics={str(deferred).lower()}")
        trainer = make_trainer(cfg, f"async-{deferred}-{packing}")
        assert type(trainer.trainer).__name__ == ("SyncFreeSFTTrainer" if deferred else "RunSFTTrainer")
        trainer.train()
        logs = [r for r in trainer.run.read_metrics() if "loss" in r or "eval_loss" in r]
        saved = json.loads((trainer.run.checkpoints / "checkpoint-6" / "trainer_state.json").read_text())
        runs[deferred] = logs, lora_state(trainer.trainer.model), saved["num_input_tokens_seen"]
    (plain_logs, plain_weights, plain_seen), (async_logs, async_weights, async_seen) = runs[False], runs[True]
    assert plain_seen == async_seen > 0  # the checkpoint's real-token count is flushed before it is saved
    assert len(plain_logs) == len(async_logs) >= 3
    for plain, fast in zip(plain_logs, async_logs):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens", "num_input_tokens_seen", "eval_loss"):
            assert (key in plain) == (key in fast), key
            if key in plain:
                assert fast[key] == pytest.approx(plain[key], rel=1e-5), (key, plain["step"])
    for name, weight in plain_weights.items():
        assert torch.allclose(weight, async_weights[name], atol=1e-6), name
