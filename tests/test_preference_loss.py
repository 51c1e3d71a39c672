"""The preference losses on a fixed batch of the tiny model: the MLX backend's DPO (sigmoid, ipo, hinge)
and ORPO loss and LoRA gradients equal TRL's, computed by the CUDA backend's trainer class (TRL 1.16's
DPOTrainer; for ORPO its override, itself checked against TRL's ORPOTrainer formulas).

Both sides run the same unquantized fp32 weights with the same LoRA factors (B nonzero, moved through
the shared PEFT -> MLX converter) on pairs encoded by the shared data layer."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import SAMPLE

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from common.config.schema import DataConfig, PreferenceConfig  # noqa: E402
from common.data.preference import prepare_pairs  # noqa: E402
from common.model.mistral import PROJECTIONS  # noqa: E402

RANK, ALPHA = 4, 8
PEFT_KEY = re.compile(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.default\.weight$")
MLX_KEY = re.compile(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([ab])$")


@pytest.fixture(scope="module")
def pairs(chat_tokenizer):
    data = prepare_pairs(DataConfig(train_file=str(SAMPLE / "pairs_train.jsonl"),
                                    val_file=str(SAMPLE / "pairs_val.jsonl"), max_seq_length=512), chat_tokenizer)
    return data.train[:3]  # one string pair, one conversational prompt, one shared-prefix conversation


def torch_trainer(tiny_model_dir, tmp_path, method: str, p: PreferenceConfig, pairs):
    """The CUDA backend's trainer class on an fp32 copy of the tiny model, LoRA B set to seeded values."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaTokenizer
    from trl import DPOConfig

    from backends.cuda.preference import preference_trainer_class, to_pair_dataset

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = LlamaTokenizer.from_pretrained(tiny_model_dir, legacy=False)
    tokenizer.pad_token = "<unk>"
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], beta=p.beta,
                     loss_type=[p.loss_type], max_length=512, per_device_train_batch_size=len(pairs))
    trainer = preference_trainer_class(method)(
        model=model, args=args, train_dataset=to_pair_dataset(pairs), processing_class=tokenizer,
        peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=list(PROJECTIONS)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return trainer


def torch_loss_and_grads(trainer, pairs):
    batch = trainer.data_collator([{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids,
                                    "rejected_ids": e.rejected_ids} for e in pairs])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {}
    for name, param in trainer.model.named_parameters():
        match = PEFT_KEY.search(name)
        if match and param.grad is not None:
            grads[(int(match[1]), match[2], match[3].lower())] = param.grad.numpy().copy()
    return loss.item(), grads


def mlx_loss_and_grads(tiny_model_dir, peft_dir, method: str, p: PreferenceConfig, pairs):
    """Our MLX loss on the same weights: the tiny model unquantized in fp32, LoRA from the PEFT files."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from backends.mlx.preference import answer_logps, pair_loss, token_logps
    from backends.mlx.trainer import MlxTrainer
    from common.adapters.conversion import mlx_tensors, read_peft
    from common.model.mistral import PARENT

    model, _ = load(str(tiny_model_dir))
    model.set_dtype(mx.float32)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                      "keys": [f"{PARENT[k]}.{k}" for k in PARENT]})
    tensors = mlx_tensors(read_peft(peft_dir), len(model.layers))
    model.load_weights([(k, mx.array(v)) for k, v in tensors.items()], strict=False)
    ids, mask = MlxTrainer.to_arrays([e.side("chosen") for e in pairs] + [e.side("rejected") for e in pairs])
    policy = model.trainable_parameters()
    model.update(tree_map_with_path(lambda path, w: mx.zeros_like(w) if path.endswith("lora_b") else w, policy))
    reference, _ = answer_logps(token_logps(model, ids), mask)  # the base: adapter disabled
    model.update(policy)

    def mean_loss(model):
        loss, n, _ = pair_loss(method, p, token_logps(model, ids), ids, mask, reference)
        return loss / n

    loss, grads = nn.value_and_grad(model, mean_loss)(model)
    out = {}
    for name, grad in tree_flatten(grads):
        match = MLX_KEY.search(name)
        out[(int(match[1]), match[2], match[3])] = np.array(grad).T
    return loss.item(), out


@pytest.mark.parametrize("method,loss_type", [("dpo", "sigmoid"), ("dpo", "ipo"), ("dpo", "hinge"), ("orpo", "sigmoid")])
def test_mlx_loss_and_gradient_equal_trls(tiny_model_dir, tmp_path, pairs, method, loss_type):
    p = PreferenceConfig(beta=0.5, loss_type=loss_type)
    trainer = torch_trainer(tiny_model_dir, tmp_path, method, p, pairs)
    trainer.model.save_pretrained(tmp_path / "peft")
    expected, expected_grads = torch_loss_and_grads(trainer, pairs)
    loss, grads = mlx_loss_and_grads(tiny_model_dir, tmp_path / "peft", method, p, pairs)
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert expected_grads.keys() == grads.keys() and len(grads) == 2 * 7 * 2
    scale = max(np.abs(g).max() for g in expected_grads.values())
    assert scale > 0
    for key, grad in expected_grads.items():
        np.testing.assert_allclose(grads[key], grad, atol=1e-4 * scale, err_msg=str(key))


def test_the_cuda_orpo_loss_is_trls_orpo(tiny_model_dir, tmp_path, pairs):
    """Our ORPO loss (an override of DPOTrainer's) equals TRL's ORPOTrainer math on the same logits."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from trl.experimental.orpo import ORPOTrainer

    p = PreferenceConfig(beta=0.5)
    trainer = torch_trainer(tiny_model_dir, tmp_path, "orpo", p, pairs)
    ours, _ = torch_loss_and_grads(trainer, pairs)
    batch = trainer.data_collator([{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids,
                                    "rejected_ids": e.rejected_ids} for e in pairs])
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = len(pairs)
    answers = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    mean_logps = ORPOTrainer.get_batch_logps(logits, answers, average_log_prob=True)
    fake = SimpleNamespace(beta=p.beta, accelerator=SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, mean_logps[:n], mean_logps[n:])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:n]
    nll = F.cross_entropy(logits[:n, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    assert ours == pytest.approx((nll - losses.mean()).item(), rel=1e-5)
