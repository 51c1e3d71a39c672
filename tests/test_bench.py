"""The benchmark harness (bench/): its arithmetic, the report it writes into docs/benchmarks.md, and
a CPU smoke run of the ablation and loss-match scripts on the tiny model (the H100 numbers
themselves come from `make bench` on a GPU, never from a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE

sys.path.insert(0, str(REPO))

from bench.ablation import MATMUL_PARAMS, category, steady_rate  # noqa: E402
from bench.report import END, START, collect, results_file, table, write_docs  # noqa: E402

H100_RESULT = REPO / "bench" / "results" / "2026-11-27-h100-80gb-hbm3-2.json"  # the table in docs/benchmarks.md
LEVERS_RESULT = REPO / "bench" / "results" / "2026-11-26-h100-80gb-hbm3-c.json"  # make bench, the levers


def test_mistral_7b_matmul_parameters():
    # 32 x (q 4096x4096 + k, v 4096x1024 + o 4096x4096 + 3 x 4096x14336) + LM head 4096x32768
    assert MATMUL_PARAMS == 7_113_539_584


def test_steady_rate_skips_the_warm_up_intervals():
    records = [
        {"step": 5, "tokens_per_second": 1000.0, "interval_tokens": 5000},  # warm-up: slow
        {"step": 10, "tokens_per_second": 4000.0, "interval_tokens": 8000},  # steps 6-10: still warm-up
        {"step": 15, "tokens_per_second": 8000.0, "interval_tokens": 8000},  # 1 s
        {"step": 15, "eval_loss": 3.0},
        {"step": 20, "tokens_per_second": 1000.0, "interval_tokens": 8000},  # the evaluation ran in here
        {"step": 25, "tokens_per_second": 4000.0, "interval_tokens": 8000},  # 2 s
    ]
    rate, step_s = steady_rate(records, warmup=10)
    assert rate == pytest.approx(16000 / 3) and step_s == pytest.approx(3 / 10)


def test_kernels_fall_into_named_categories():
    assert category("nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_TNT").startswith("matmul")
    assert category("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>").startswith("bitsandbytes")
    assert category("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90").startswith("attention")
    assert category("void at::native::fused_dropout_kernel_vec<c10::BFloat16>") == "dropout"
    assert category("_rms_norm_backward_kernel").startswith("Liger")


def test_the_report_table_holds_every_lever_and_the_loss_match():
    text = table(json.loads(LEVERS_RESULT.read_text()))
    assert "| stock TRL (padded batches, no packing) | sdpa | 4 x 4 | 32 | no | no | 46% | 2,500 | 1.00x |" in text
    assert "| +fused-lora | flash_attention_4 | 4 x 1 | 32 | RMSNorm + SwiGLU | yes | 0% | 9,139 | 3.66x | 12.1 |" in text
    assert "within bf16 tolerance: yes" in text and "trl 1.16.0" in text
    shipped = table(json.loads(H100_RESULT.read_text()))  # stock, Unsloth and qlora train on one machine
    assert "**13,011 real tokens/s steady** (5.14x stock), 11,828 over the whole loop (91% of steady), peak 38.5 GB" in shipped
    assert "| Unsloth 2026.10.9 (packed 4 x 4096, sdpa) | 0.05 | 7,828 | 3.09x | 1.00x | 8.7 |" in shipped
    assert "| 0.05 | 13,011 | 5.14x | 1.66x | 38.5 |" in shipped  # the shipped config, against Unsloth at 0.05
    assert "| 2 x 2, none checkpointed | flash_attention_4 | 2 x 2 | 0 | RoPE + RMSNorm + SwiGLU | yes, masks replayed |" in shipped
    assert "Levers: measured on machine F" in shipped  # the levers ran on another machine: the table says so
    assert "| mlx_lm | no | yes | 96 | 32.7 |  |  | 0.019 |" in shipped  # the MLX comparison (no warm/late rates then)
    assert "| ours_plain | no | no | 96 | 33.4 |  |  | 0.019 |" in shipped and "MLX note: after this round" in shipped
    mlx = table(json.loads((REPO / "bench" / "results" / "2026-11-28-mlx-compare-h100.json").read_text()))
    assert "| ours | yes | no | 68 | 243.8 | 284.4 | 310.6 | 5.305 |" in mlx  # whole, warm and late rates; GiB
    assert "| mlx_lm | no | yes | 96 | 176.5 | 231.4 | 260.6 | 5.329 |" in mlx


def test_make_bench_collects_the_liger_kernels_one_at_a_time(tmp_path):
    def variant(name, kernels, rate, peak):
        return {"variant": name, "liger": kernels, "steady_tokens_per_second": rate, "peak_memory_gb": peak}

    (tmp_path / "ablation-liger-a.json").write_text(json.dumps({"variants": [
        variant("no-liger", [], 8490.1, 40.05), variant("rms_norm+swiglu", ["rms_norm", "swiglu"], 9860.0, 33.89),
        {"variant": "all-liger", "error": "RuntimeError: CUDA out of memory"}]}))
    (tmp_path / "ablation-liger-b.json").write_text(json.dumps({"variants": [variant("rope", ["rope"], 7150.4, 40.1)]}))
    (tmp_path / "stock.json").write_text(json.dumps({"real_tokens_per_second": 2500.0, "peak_memory_gb": 13.6}))
    # the `whole` step's qlora train metrics: warm-up, steady intervals, one with an evaluation in it
    records = [{"step": 5, "tokens_per_second": 5000.0, "interval_tokens": 80000},
               {"step": 10, "tokens_per_second": 10000.0, "interval_tokens": 80000},
               {"step": 15, "tokens_per_second": 10000.0, "interval_tokens": 80000},
               {"step": 15, "eval_loss": 4.3},
               {"step": 20, "tokens_per_second": 4000.0, "interval_tokens": 80000},
               {"step": 25, "tokens_per_second": 11000.0, "interval_tokens": 110000},
               {"step": 25, "train_runtime": 50.0, "train_loss": 5.0, "num_input_tokens_seen": 430000}]
    (tmp_path / "train-metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = collect(tmp_path)
    text = table(result)
    assert "`bench/run_h100.sh` stock, liger, whole (steps" in text  # the steps that ran, no others
    assert result["qlora_train"]["eval_loss"] == {15: 4.3}
    # steady: steps 11-15 and 21-25 (190,000 tokens in 8 + 10 s); the evaluated interval left out
    assert "**10,556 real tokens/s steady** (4.22x stock), 8,600 over the whole loop" in text
    assert "| no | 8,490 | 40.0 | a, 1 |" in text
    assert "| RMSNorm + SwiGLU | 9,860 | 33.9 | a, 2 |" in text
    assert "| all-liger | failed: RuntimeError: CUDA out of memory | | a, 3 |" in text
    assert "| RoPE | 7,150 | 40.1 | b, 1 |" in text


def test_a_results_file_is_never_overwritten(tmp_path):
    result = {"date": "2026-11-26", "gpu": "NVIDIA H100 80GB HBM3"}
    first = results_file(result, folder=tmp_path)
    assert first.name == "2026-11-26-h100-80gb-hbm3.json"
    first.write_text("{}")
    with pytest.raises(SystemExit, match="--tag NAME to keep both"):
        results_file(result, folder=tmp_path)
    assert results_file(result, "Machine D", folder=tmp_path).name == "2026-11-26-h100-80gb-hbm3-machine-d.json"
    assert first.read_text() == "{}"


def test_the_docs_table_is_the_committed_results(tmp_path):
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    committed = docs.split(START, 1)[1].split(END, 1)[0].strip()
    assert committed == table(json.loads(H100_RESULT.read_text())).strip()
    copy = tmp_path / "benchmarks.md"
    copy.write_text(docs)
    write_docs("new table\n", copy)
    write_docs("newer table\n", copy)  # replaces, never appends
    text = copy.read_text()
    assert text.count(START) == 1 and "newer table" in text and "new table\n" not in text
    assert text.split(START)[0] == docs.split(START)[0]


@pytest.mark.slow
def test_ablation_and_loss_match_run_on_the_cpu(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    cpu = REPO / "configs" / "training_config_cpu.yaml"
    out = tmp_path / "ablation.json"
    data = [f"--data-dir={tmp_path}"]
    (tmp_path / "train.jsonl").write_text((SAMPLE / "train.jsonl").read_text())
    (tmp_path / "val.jsonl").write_text((SAMPLE / "val.jsonl").read_text())
    done = subprocess.run(
        [sys.executable, "bench/ablation.py", "--config", str(cpu), *data, "--steps", "12", "--warmup", "2",
         "--train-subset", "120", "--runs", str(tmp_path / "runs"), "--out", str(out),
         "--variant", f"plain=cuda.fused_lora=false model.name_or_path={tiny_model_dir}",
         "--variant", f"levers=cuda.checkpointed_layers=1 model.name_or_path={tiny_model_dir}",
         "--profile", "levers"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows["plain"]["fused_lora"] is False and rows["levers"]["checkpointed_layers"] == 1
    assert all(r["steady_tokens_per_second"] > 0 and r["steps"] >= 12 for r in rows.values())
    assert result["profile"]["variant"] == "levers" and (tmp_path / "profile-levers.txt").is_file()

    match = tmp_path / "loss-match.json"
    done = subprocess.run(
        [sys.executable, "bench/loss_match.py", "--model", str(tiny_model_dir), "--data", str(SAMPLE / "train.jsonl"),
         "--config", str(cpu), "--examples", "8", "--out", str(match)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(match.read_text())["within_bf16_tolerance"] is True


def curve(scale: float, evals: dict[int, float] | None = None) -> list[dict]:
    records = [{"step": s, "loss": scale * (4 + 6 * 0.97**s)} for s in range(10, 301, 10)]
    return records + [{"step": s, "eval_loss": v} for s, v in (evals or {}).items()]


def test_curves_that_match_follow_and_curves_that_drift_do_not(tmp_path):
    from bench.compare_curves import compare, plot

    stock = curve(1.0, {100: 4.20, 200: 4.11, 300: 4.10})
    close = compare(stock, curve(1.01, {100: 4.21, 200: 4.12, 300: 4.11}))
    assert close["follows"] and close["worst_train"] == pytest.approx(0.01) and close["compared_steps"][0] == 40
    assert not compare(stock, curve(1.08, {100: 4.2}))["follows"]  # training loss 8% off
    assert not compare(stock, curve(1.0, {100: 4.40}))["follows"]  # same training loss, evaluation 5% off
    plot(stock, curve(1.01), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def _run_folder(path, rate: float, steps: int = 30, interrupted: bool = False):
    """A run folder as `qlora train` writes it: an interval every 5 steps at `rate` tokens/s (8,000
    tokens each), one evaluation at step 15, the end record; summary.json."""
    path.mkdir()
    records = []
    for step in range(5, steps + 1, 5):
        records.append({"step": step, "tokens_per_second": rate, "interval_tokens": 8000})
        if step == 15:
            records.append({"step": step, "eval_loss": 3.0})
    records.append({"step": steps, "train_runtime": 8000 * steps / 5 / rate * 1.1, "train_loss": 4.0,
                    "num_input_tokens_seen": 8000 * steps // 5})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({
        "global_step": steps, "max_steps": 30, "interrupted": interrupted, "peak_memory_gb": 38.5,
        "train_loss": 4.0, "final_eval_loss": 3.0, "wall_seconds": 99.0}))
    return path


def test_multi_gpu_results_name_each_gpu_count_and_the_speed_up(tmp_path):
    one, two = _run_folder(tmp_path / "gpus-1", 10_000), _run_folder(tmp_path / "gpus-2", 19_000)
    out = tmp_path / "multi.json"
    command = [sys.executable, str(REPO / "bench" / "multi_gpu.py"), "--run", f"1={one}", "--run", f"2={two}",
               "--machine", "2x test GPU", "--date", "2026-11-27", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    rows = {row["gpus"]: row for row in result["rows"]}
    assert result["machine"] == "2x test GPU" and set(rows) == {1, 2}
    assert rows[1]["steady_tokens_per_second"] == pytest.approx(10_000)
    assert rows[2]["speedup_steady"] == pytest.approx(1.9) and rows[2]["speedup_whole_loop"] == pytest.approx(1.9)
    assert rows[2]["reached_max_steps"] and rows[2]["peak_memory_gb"] == 38.5
    # an existing results file is kept; a stopped run says it did not reach its last step
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode != 0 and "already holds" in again.stderr
    stopped = _run_folder(tmp_path / "stopped", 19_000, steps=20, interrupted=True)
    from bench.multi_gpu import run_row

    assert not run_row(2, stopped)["reached_max_steps"]


@pytest.mark.slow
def test_mlx_compare_times_each_step_of_both_trainers(tmp_path):
    """bench/mlx_compare.py on the tiny model: each trainer's optimizer steps carry the real tokens
    they trained on (together: every example once) and their seconds, so a warm rate (after the
    first step, where the compiles are) is reported beside the whole run's; with --no-buffer-cache
    MLX keeps no freed buffers for reuse."""
    pytest.importorskip("mlx_lm")
    out = tmp_path / "mlx.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "mlx_compare.py"), "--runs", "mlx_lm,ours", "--steps", "4",
                    "--accumulation", "4", "--no-buffer-cache", "--workdir", str(tmp_path), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text())
    assert [run["run"] for run in result["runs"]] == ["mlx_lm", "ours"]
    for run in result["runs"]:
        steps = run["step_tokens_and_seconds"]
        assert len(steps) == 4 and sum(tokens for tokens, _ in steps) == run["real_tokens"] > 0
        assert all(seconds > 0 for _, seconds in steps)
        rate = lambda part: sum(t for t, _ in part) / sum(s for _, s in part)  # noqa: E731
        assert run["warm_real_tokens_per_second"] == pytest.approx(rate(steps[1:]), rel=1e-3)
        assert run["late_real_tokens_per_second"] == pytest.approx(rate(steps[2:]), rel=1e-3)
        assert run["buffer_cache"] is False and run["cache_memory_gb_at_end"] == 0
    assert result["buffer_cache"].startswith("off")
    assert result["ours"]["run"] == "ours" and result["mlx_lm"]["run"] == "mlx_lm"


def test_a_long_context_point_holds_the_plan_the_peak_the_steady_rate_and_the_first_step(tmp_path):
    from bench.long_context import collect

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"figures": [{"name": "peak memory", "value": 55.4}]}))
    run = tmp_path / "long-32768"
    run.mkdir()
    start = 1000.0
    # step 1 at 90 s (loading, quantizing, compiling); warm-up steps at 1,000 tokens/s, then 2,000
    steps = [{"step": s, "time": start + 90 + s, "loss": 1.0, "interval_tokens": 32_000,
              "tokens_per_second": 1_000.0 if s <= 5 else 2_000.0} for s in range(1, 9)]
    records = [*steps, {"step": 8, "time": start + 200, "eval_loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({"peak_memory_gb": 61.0, "tokens_per_second": 1_500.0}))
    point = collect(32768, start, plan, run)
    assert point["plan_peak_gb"] == 55.4 and point["peak_memory_gb"] == 61.0
    assert point["steady_tokens_per_second"] == pytest.approx(2_000.0)  # the warm-up steps left out
    assert point["seconds_to_first_step"] == pytest.approx(91.0)  # from outside: the summary has no startup

    stages = {"data": 2.0, "model": 30.0, "trainer": 5.0, "first_step": 50.0}
    (run / "summary.json").write_text(json.dumps({"peak_memory_gb": 61.0, "startup": {
        "stages": stages, "seconds_to_first_step": 89.5, "first_step": 1}}))
    point = collect(32768, start, plan, run)  # the run's own figure, preferred
    assert point["seconds_to_first_step"] == 89.5 and point["startup_stages"] == stages
    assert point["seconds_to_first_logged_step_from_shell"] == pytest.approx(91.0)

    (run / "summary.json").unlink()  # a run that died (out of memory, say) is named, with its plan
    failed = collect(32768, start, plan, run)
    assert failed["plan_peak_gb"] == 55.4 and "no summary.json" in failed["failed"]


UNSLOTH_ARGS = ["--model", "/tmp/m", "--tokens", "tokens.json", "--out", "out.json"]
LONG_LAYOUT = {"max_seq_length": 8192, "batch_size": 1, "gradient_accumulation_steps": 2,
               "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
               "optimizer": {"name": "paged_adamw_32bit", "learning_rate": 1e-4}}


def test_unsloth_takes_the_configs_layout_from_the_tokens_file_unless_told_otherwise(capsys):
    """bench/unsloth_baseline.py runs without this project (Unsloth's own environment): the long-context
    config's micro-batch, accumulation, LoRA and optimizer come from bench/export_tokens.py's file."""
    from bench.unsloth_baseline import parse_args, settings

    run = settings(LONG_LAYOUT, parse_args([*UNSLOTH_ARGS, "--steps", "20", "--warmup", "5"]))
    assert (run["max_length"], run["rows"], run["accumulation"]) == (8192, 1, 2)
    assert run["lora"]["dropout"] == 0.05 and run["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert run["optimizer"]["learning_rate"] == 1e-4 and run["optimizer"]["max_grad_norm"] == 0.3  # the rest: the seed's
    # the 4096 step's fixed layout (4 rows x 1) and its two dropouts win over the file's
    run = settings(LONG_LAYOUT, parse_args([*UNSLOTH_ARGS, "--rows", "4", "--accumulation", "1", "--dropout", "0"]))
    assert (run["rows"], run["accumulation"], run["lora"]["dropout"]) == (4, 1, 0.0)
    # a tokens file from before the layout was written: 4 x 1, and the dropout must be named
    old = {"max_seq_length": 4096}
    assert settings(old, parse_args([*UNSLOTH_ARGS, "--dropout", "0.05"]))["rows"] == 4
    with pytest.raises(SystemExit, match="names no LoRA dropout: pass --dropout"):
        settings(old, parse_args(UNSLOTH_ARGS))
    for bad, says in ((["--steps", "20", "--warmup", "20"], "leaves no step"), (["--rows", "0"], "--rows must be"),
                      (["--dropout", "1.5"], "--dropout must be"), (["--logging-steps", "0"], "--logging-steps")):
        with pytest.raises(SystemExit):
            parse_args([*UNSLOTH_ARGS, *bad])
        assert says in capsys.readouterr().err


def test_unsloths_steady_rate_leaves_out_the_warm_up_steps():
    from bench.unsloth_baseline import steady_rate

    marks = [(0, 100.0, 0), (1, 160.0, 16_000)] + [(s, 160.0 + 2 * (s - 1), 16_000 * s) for s in range(2, 21)]
    assert steady_rate(marks, warmup=5) == pytest.approx(8_000)  # steps 6-20: 15 x 16,000 tokens in 30 s
    assert steady_rate(marks, warmup=0) < 8_000  # the first step's 60 s (loading, compiling) counted


def test_the_examples_kept_for_a_number_of_steps():
    from bench.export_tokens import examples_for_steps

    assert examples_for_steps([5, 5, 5, 5], tokens_per_step=4, steps=2) == 3  # 1.5 x 8 tokens: 15 >= 12
    assert examples_for_steps([5, 5], tokens_per_step=4, steps=10) == 2  # too few: all of them


def test_long_documents_reach_unsloth_as_our_data_layers_ids_packed_into_rows_of_the_configs_length(tmp_path):
    """`bash bench/run_h100.sh long-tokens 16384` on the CPU: the documents' ids from our data layer
    (examples past 16,384 tokens handled as `qlora train` handles them), then TRL's BFD packing, the
    step Unsloth's patched SFTTrainer takes, into rows of at most 16,384 tokens of whole documents."""
    pytest.importorskip("trl")
    from bench.unsloth_baseline import IGNORE, columns, packed, row_stats

    docs, out = tmp_path / "doc", tmp_path / "tokens-16384.json"
    subprocess.run([sys.executable, "bench/make_chat_data.py", "--kind", "document", "--train", "16", "--val", "2",
                    "--out", str(docs)], check=True, capture_output=True, cwd=REPO)
    done = subprocess.run(
        [sys.executable, "bench/export_tokens.py", "--config", "configs/training_config_h100_16k.yaml",
         "--set", f"data.train_file={docs / 'train.jsonl'}", "--set", f"data.val_file={docs / 'val.jsonl'}",
         "--steps", "2", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    tokens = json.loads(out.read_text())
    assert {k: tokens[k] for k in ("max_seq_length", "batch_size", "gradient_accumulation_steps")} == {
        "max_seq_length": 16384, "batch_size": 1, "gradient_accumulation_steps": 1}  # training_config_h100_16k.yaml
    assert tokens["lora"]["r"] == 16 and len(tokens["lora"]["target_modules"]) == 7
    lengths = [len(ids) for ids in tokens["input_ids"]]
    assert max(lengths) <= 16_384 and sum(lengths[:-1]) < 1.5 * 2 * 16_384 <= sum(lengths)  # 2 steps' tokens, x1.5
    assert f"wrote {len(lengths)} examples, {sum(lengths):,} tokens" in done.stdout

    data = columns(tokens)
    assert [[label != IGNORE for label in labels] for labels in data["labels"]] == [
        [bool(keep) for keep in mask] for mask in tokens["loss_mask"]]
    rows = packed(data, 16_384)
    for ids, labels, documents in zip(rows["input_ids"], rows["labels"], rows["seq_lengths"], strict=True):
        assert len(ids) == len(labels) == sum(documents) <= 16_384
    assert sorted(n for documents in rows["seq_lengths"] for n in documents) == sorted(lengths)  # whole, each once
    assert sum(label != IGNORE for labels in rows["labels"] for label in labels) == sum(map(sum, tokens["loss_mask"]))
    stats = row_stats(rows, 16_384)
    assert stats["packed_rows"] == len(rows) < len(lengths) and 0.5 < stats["packed_row_fill"] <= 1  # rows shared


def test_the_unsloth_long_steps_name_their_length():
    for step in ("unsloth-long", "long-tokens", "long-compare"):
        done = subprocess.run(["bash", "bench/run_h100.sh", step], capture_output=True, text=True, cwd=REPO)
        assert done.returncode != 0 and f"{step} N: 8192, 16384 or 32768" in done.stderr
    usage = subprocess.run(["bash", "bench/run_h100.sh"], capture_output=True, text=True, cwd=REPO).stdout
    assert "unsloth-long 32768" in usage and "long-compare 32768" in usage


def test_compare_table_sets_the_three_trainers_side_by_side(tmp_path):
    """bench/compare.py: each trainer's figures at each length from the files the steps write; a missing
    or failed run reads "not measured", never a number from another row."""
    from bench.compare import rows, table

    def write(name, data):
        (tmp_path / name).write_text(json.dumps(data))

    write("ablation.json", {"variants": [{"variant": "shipped", "overrides": [], "steady_tokens_per_second": 15000.0,
                                          "peak_memory_gb": 38.0, "micro_batch_rows": 2, "accumulation": 2}]})
    write("plan-4096.json", {"figures": [{"name": "peak memory", "value": 38.4}]})
    write("stock.json", {"real_tokens_per_second": 3000.0, "peak_memory_gb": 20.0, "name": "stock"})
    write("unsloth-dropout-0.05.json", {"real_tokens_per_second": 7500.0, "peak_memory_gb": 8.7,
                                        "attention_dispatch": {"packed_kernel": "sdpa"}})
    write("long-32768.json", {"steady_tokens_per_second": 10000.0, "peak_memory_gb": 53.6, "plan_peak_gb": 55.4})
    write("unsloth-long-32768.json", {"real_tokens_per_second": 4000.0, "peak_memory_gb": 30.0})
    write("stock-long-32768.json", {"real_tokens_per_second": None})  # a run that failed to time any step
    (tmp_path / "stock-long-8192.json").write_text("")  # a run killed before it wrote
    found = {(r["length"], r["data"]): r for r in rows(tmp_path)}
    chat = found[(4096, "chat (bench)")]
    assert chat["ours_over_stock"] == pytest.approx(5.0) and chat["ours_over_unsloth"] == pytest.approx(2.0)
    assert chat["plan_peak_gb"] == 38.4 and chat["unsloth"]["attention"] == "sdpa"
    longest = found[(32768, "documents")]
    assert longest["stock"] is None and longest["ours_over_unsloth"] == pytest.approx(2.5)
    assert found[(8192, "documents")]["ours"] is None
    text = table(rows(tmp_path))
    assert "| 4096 | chat (bench) | 15,000 | 38.00 | 38.40 | 3,000 | 20.00 | 7,500 | 8.70 | 5.00x | 2.00x |" in text
    assert "| 32768 | documents | 10,000 | 53.60 | 55.40 | not measured | - | 4,000 | 30.00 | - | 2.50x |" in text
