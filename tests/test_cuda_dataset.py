"""The CUDA backend's training dataset is built from the token arrays (backends/cuda/dataset.py), never
from Python lists of every example: TRL trains on the same rows, and the first step's loss is exactly
the one of the list-built dataset TRL prepared itself (the path before it)."""

from __future__ import annotations

import pytest
from conftest import SAMPLE
from test_cuda_backend import make_trainer, tiny_config

pytest.importorskip("trl")
pytest.importorskip("bitsandbytes")

from backends.cuda.dataset import IGNORE, TokenColumns, to_dataset  # noqa: E402
from bench.data_at_scale import as_before  # noqa: E402
from common.config.schema import DataConfig  # noqa: E402
from common.data.prepare import prepare_data  # noqa: E402
from common.data.tokenize import Example  # noqa: E402


def test_columns_hold_every_example_stored_or_not(chat_tokenizer):
    stored = prepare_data(DataConfig(train_file=str(SAMPLE / "train.jsonl"), val_file=None), chat_tokenizer).train
    plain = [Example([1, 3, 40000, 4, 9], [0, 0, 0, 1, 1])]  # a plain Example (preference data, tests)
    examples = [*stored[:5], *plain, *stored[5:9]]
    dataset = to_dataset(examples)
    assert len(dataset) == len(examples)
    for row, example in zip(dataset, examples, strict=True):
        assert row["input_ids"] == example.input_ids
        assert row["labels"] == [t if m else IGNORE for t, m in zip(example.input_ids, example.loss_mask)]
    assert TokenColumns.of(examples).ids.dtype.name == "int32"  # id 40000 does not fit int16
    assert TokenColumns.of(stored).ids.dtype.name == "int16"  # the 32768-token vocabulary does
    assert len(to_dataset([])) == 0


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False])
def test_same_rows_and_first_step_loss_as_the_list_built_dataset(tiny_model_dir, tmp_path, monkeypatch, packing):
    steps = [f"training.packing={str(packing).lower()}", "training.max_steps=1", "eval.logging_steps=1",
             "eval.eval_steps=100", "eval.save_steps=100", "data.max_seq_length=256", "training.batch_size=2",
             "eval.load_best_model_at_end=false"]
    new = make_trainer(tiny_config(tiny_model_dir, tmp_path, *steps), f"arrays-{packing}")
    as_before(monkeypatch.setattr)  # Python lists of every example; TRL prepared them (labels, truncation)
    old = make_trainer(tiny_config(tiny_model_dir, tmp_path, *steps), f"lists-{packing}")
    for name in ("train_dataset", "eval_dataset"):
        got, expected = getattr(new.trainer, name), getattr(old.trainer, name)
        assert got.column_names == expected.column_names
        assert got[:] == expected[:]  # every row, every column (packed: seq_lengths too)
    new.train()
    old.train()
    losses = [[r["loss"] for r in t.run.read_metrics() if "loss" in r] for t in (new, old)]
    assert len(losses[0]) == 1 and losses[0] == losses[1]
