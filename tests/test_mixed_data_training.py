"""Both backends train, through the shared examples, on mixed sources (ShareGPT .jsonl, Alpaca
.parquet, OpenAI function-calling .json, a prompt/completion .csv for validation): the tiny model's
LoRA weights move, the loss is finite, and the batches carry the tool-call tokens as targets and the
tool results as prompt."""

from __future__ import annotations

import csv
import json
import math

import pytest
from conftest import write_jsonl

from common.config.loader import load_config
from common.console import Say
from common.data.prepare import prepare_data
from common.data.tokenize import ChatTokenizer
from common.run.folder import RunFolder

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def tool_record(i: int) -> dict:
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"Weather in city {i}?"},
        {"role": "assistant", "tool_calls": [{"id": f"call_{i}", "type": "function",
                                              "function": {"name": "get_weather", "arguments": {"city": f"c{i}"}}}]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{i} degrees"},
        {"role": "assistant", "content": f"It is {i} degrees."}]}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mixed")
    write_jsonl(root / "share.jsonl", [{"conversations": [{"from": "human", "value": f"hi {i}"},
                                                          {"from": "gpt", "value": f"hello {i}"}]} for i in range(8)])
    pq.write_table(pa.Table.from_pylist([{"instruction": f"count to {i}", "output": " ".join(map(str, range(i)))}
                                         for i in range(2, 10)]), root / "alpaca.parquet")
    (root / "tools.json").write_text(json.dumps([tool_record(i) for i in range(8)]))
    with (root / "val.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])
        writer.writerows([[f"q{i}", f"a{i}"] for i in range(4)])
    sources = (f"data.sources=[{{path: {root / 'share.jsonl'}}}, {{path: {root / 'alpaca.parquet'}, max_examples: 6}}, "
               f"{{path: {root / 'tools.json'}, weight: 2}}]")
    return root, sources


def config(model_dir, out, sources, val, *extra):
    return load_config(platform="cpu", overrides=[
        f"model.name_or_path={model_dir}", f"tracking.output_dir={out}", sources, f"data.val_file={val}",
        "tracking.report_to=none", "data.max_seq_length=256", "training.max_steps=2", "training.batch_size=2",
        "training.gradient_accumulation_steps=1", "eval.eval_steps=2", "eval.save_steps=2", "eval.logging_steps=1",
        "training.learning_rate=3e-3", *extra])


def test_the_prepared_examples_mask_tool_calls_in_and_tool_results_out(tiny_model_dir, mixed, tmp_path):
    root, sources = mixed
    cfg = config(tiny_model_dir, tmp_path, sources, root / "val.csv")
    tokenizer = ChatTokenizer()
    data = prepare_data(cfg.data, tokenizer)
    assert (len(data.train), len(data.val)) == (8 + 6 + 2 * 8, 4)
    special = tokenizer._mistral.instruct_tokenizer
    with_calls = [e for e in data.train if special.TOOL_CALLS in e.input_ids]
    assert len(with_calls) == 16
    for example in with_calls:
        at = example.input_ids.index(special.TOOL_CALLS)
        result = example.input_ids.index(special.BEGIN_TOOL_RESULTS)
        tools = example.input_ids.index(special.BEGIN_AVAILABLE_TOOLS)
        assert example.loss_mask[at] == 1 and example.loss_mask[result] == 0 and example.loss_mask[tools] == 0


def _moved(before: dict, after: dict) -> bool:
    return any(float(abs(after[k] - before[k]).max()) > 0 for k in before)


def test_cuda_backend_trains_on_mixed_sources(tiny_model_dir, mixed, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    from backends.cuda.trainer import CudaTrainer

    root, sources = mixed
    cfg = config(tiny_model_dir, tmp_path, sources, root / "val.csv")
    cfg.tracking.run_name = "mixed-cuda"
    trainer = CudaTrainer(cfg, RunFolder.create(cfg), prepare_data(cfg.data, ChatTokenizer()), Say())
    trainer.setup()
    lora = lambda: {n: p.detach().float().clone() for n, p in trainer.trainer.model.named_parameters() if "lora_B" in n}  # noqa: E731
    before = lora()
    summary = trainer.train()
    assert summary.global_step == 2 and math.isfinite(summary.final_eval_loss or summary.best_eval_loss)
    assert _moved(before, lora())


def test_mlx_backend_trains_on_mixed_sources(tiny_model_dir, mixed, tmp_path):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    import numpy as np
    from mlx.utils import tree_flatten

    from backends.mlx.trainer import MlxTrainer

    root, sources = mixed
    cfg = config(tiny_model_dir, tmp_path, sources, root / "val.csv", "backend=mlx",
                 f"mlx.model_cache_dir={tmp_path / 'models'}", "eval.eval_batch_size=16")
    cfg.tracking.run_name = "mixed-mlx"
    trainer = MlxTrainer(cfg, RunFolder.create(cfg), prepare_data(cfg.data, ChatTokenizer()), Say())
    trainer.setup()
    lora = lambda: {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters()) if "lora_b" in k}  # noqa: E731
    before = lora()
    summary = trainer.train()
    assert summary.global_step == 2 and math.isfinite(summary.final_eval_loss or summary.best_eval_loss)
    assert _moved(before, lora())
