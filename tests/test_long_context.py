"""Long context on the CUDA backend's real path (tiny Mistral, CPU): a packed row of 16,384 tokens
holding several long documents gives each document exactly the logits and the loss it gets alone,
so packing, attention and the loss stay exact across document boundaries at a long length."""

from __future__ import annotations

import pytest
from conftest import chat, write_jsonl

pytest.importorskip("trl")
pytest.importorskip("bitsandbytes")

import torch  # noqa: E402

from backends.cuda.trainer import CudaTrainer  # noqa: E402
from common.config.loader import load_config  # noqa: E402
from common.console import Say  # noqa: E402
from common.data.prepare import prepare_data  # noqa: E402
from common.data.tokenize import ChatTokenizer  # noqa: E402
from common.run.folder import RunFolder  # noqa: E402

LENGTH = 16384


def documents(n: int) -> list[dict]:
    """Long synthetic documents of ~3,000 to ~5,800 tokens, each with a question and an answer."""
    words = "river planet garden window market forest castle bridge candle mirror harbor".split()
    docs = []
    for i in range(n):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] + ("." if j % 17 == 16 else "") for j in range(800 + 150 * i))
        docs.append(chat(f"Document {i}:\n{text}\n\nSummarize it.", f"Document {i} is about {words[i]}s. " * 20))
    return docs


@pytest.mark.slow
def test_a_packed_long_row_gives_each_document_its_own_logits_and_loss(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", documents(6))
    held_out = write_jsonl(tmp_path / "val.jsonl", documents(1))
    cfg = load_config(platform="cpu", overrides=[
        f"model.name_or_path={tiny_model_dir}", f"tracking.output_dir={tmp_path / 'runs'}",
        f"data.train_file={data}", f"data.val_file={held_out}", "tracking.report_to=none",
        f"data.max_seq_length={LENGTH}", "training.packing=true", "training.batch_size=1",
        "training.max_steps=1", "lora.dropout=0",
        "cuda.quantization.compute_dtype=float32", "cuda.bf16=false",  # fp32: equal up to summation order f"data.cache_dir={tmp_path / 'cache'}",
    ])
    cfg.tracking.run_name = "long"
    prepared = prepare_data(cfg.data, ChatTokenizer())
    trainer = CudaTrainer(cfg, RunFolder.create(cfg), prepared, Say())
    trainer.setup()
    sft = trainer.trainer
    row = max(sft.train_dataset, key=lambda r: len(r["input_ids"]))
    batch = sft.data_collator([row])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3 and len(row["input_ids"]) > LENGTH // 2  # several documents, one long row
    model = sft.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        unpacked = model(input_ids=batch["input_ids"]).logits[0]  # one causal sequence: documents see each other
        total, targets = 0.0, 0
        for start, end in zip(starts, [*starts[1:], batch["input_ids"].size(1)]):
            ids, labels = batch["input_ids"][:, start:end], batch["labels"][:, start:end]
            alone = model(input_ids=ids).logits[0]
            assert (packed[start:end] - alone).abs().max() < 1e-3, f"the document at token {start} sees another"
            if start:  # the check can fail: without the packed positions the same row leaks
                assert (unpacked[start:end] - alone).abs().max() > 0.1
            assert labels[0, 0] == -100  # a document's first token is never a target of the one before
            shifted = labels[0, 1:]
            total += torch.nn.functional.cross_entropy(alone[:-1], shifted, ignore_index=-100, reduction="sum").item()
            targets += int((shifted != -100).sum())
        whole = torch.nn.functional.cross_entropy(packed[:-1], batch["labels"][0, 1:], ignore_index=-100,
                                                  reduction="sum").item()
    assert targets == int((batch["labels"] != -100).sum())  # every target belongs to one document
    assert whole == pytest.approx(total, rel=1e-5)
