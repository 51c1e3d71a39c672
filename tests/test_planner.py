"""`qlora plan`: the arithmetic with fixed rates, the "does not fit" advice, and a real calibration."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE

from common.config.loader import load_config
from common.plan.planner import Rates, anchor_rates, cuda_peak_gb, make_plan, padded_tokens, steps_per_epoch

RATES = Rates(tokens_per_second=10_000, peak_gb=12.5, eval_tokens_per_second=20_000, save_seconds=5,
              startup_seconds=60, source="fixed", measured=True)


def figures(plan):
    return {f.name: f.value for f in plan.figures}


def test_packed_arithmetic():
    cfg = load_config(platform="h100")  # 4 rows x 4096 a step, 3 epochs
    lengths = [1000] * 100  # 100K real tokens: 25 rows at 98% fill, 7 steps an epoch
    assert steps_per_epoch(cfg, lengths) == (7, 100_000)
    plan = make_plan(cfg, lengths, [500] * 20, RATES, 80, "m", (1.0, "x"))
    f = figures(plan)
    assert f["optimizer steps"] == 21 and f["padding"] == 0
    assert f["training time"] == pytest.approx(300_000 / 10_000 / 3600)
    # startup + training + 1 evaluation (step 21 < 100: the final one) * 0.5 s + 1 save * 5 s
    assert f["total wall time"] == pytest.approx((60 + 30 + 0.5 + 5) / 3600)
    assert plan.fits and plan.advice == []


def test_padding_is_simulated_without_packing():
    assert padded_tokens([10, 30], batch=2, seed=0) == 60
    cfg = load_config(platform="m4", overrides=["training.batch_size=2", "training.gradient_accumulation_steps=1"])
    plan = make_plan(cfg, [10, 30] * 50, [10], RATES, 32, "m", (1.0, "x"))
    assert 0 < figures(plan)["padding"] <= 100 * (1 - 40 / 60) + 1e-9


def test_memory_that_does_not_fit_gets_concrete_changes():
    plan = make_plan(load_config(platform="h100"), [1000] * 10, [100], RATES, 8, "m", (1.0, "x"))
    assert not plan.fits
    assert any("data.max_seq_length (4096 -> 2048)" in a and "training.batch_size (2 -> 1)" in a for a in plan.advice)


# Peak GB measured (docs/benchmarks.md; the peak does not depend on the card). 2026-11-26, with the
# dropout masks stored (before cuda.replay_dropout; its `false` is the same path, measured at 34.16 GB
# against 33.94 for the first point): an H200 for the micro-batch and checkpointing points, an H100
# for the Liger ones, all from the then H100 config of 4 rows x 1, 24 of 32 layers checkpointed.
STORED = ["training.batch_size=4", "training.gradient_accumulation_steps=1", "training.gradient_checkpointing=true",
          "cuda.replay_dropout=false"]
FOUR_ROWS = ["training.batch_size=4", "training.gradient_accumulation_steps=1", "training.gradient_checkpointing=true"]
TORCH_DROPOUT_PEAKS = [  # measured before cuda.dropout_kernel: torch's dropout
    (STORED + ["cuda.checkpointed_layers=24"], 33.94),
    (STORED + ["cuda.checkpointed_layers=24", "cuda.use_liger=false"], 40.05),
    (STORED + ["cuda.checkpointed_layers=24", "cuda.liger_kernels=[rms_norm]"], 37.39),
    (STORED + ["cuda.checkpointed_layers=24", "cuda.liger_kernels=[rope,swiglu]"], 36.60),
    (STORED + ["cuda.checkpointed_layers=all"], 12.20),
    (STORED + ["cuda.checkpointed_layers=23"], 36.99),
    (STORED + ["cuda.checkpointed_layers=22"], 40.09),
    (STORED + ["cuda.checkpointed_layers=24", "training.batch_size=2"], 19.22),
    (STORED + ["training.batch_size=2", "cuda.checkpointed_layers=16"], 31.77),
    (STORED + ["training.batch_size=1", "cuda.checkpointed_layers=4"], 27.55),
    (STORED + ["training.batch_size=2", "cuda.checkpointed_layers=all"], 8.28),
    # 2026-11-27, H100s (bench/results/2026-11-27-h100-80gb-hbm3-2.json): masks replayed
    ([], 38.49),  # the shipped config: 2 rows x 2, 1 layer checkpointed (machine G, through qlora train)
    (["training.gradient_checkpointing=false", "cuda.checkpointed_layers=all"], 39.43),  # machine F from here
    (["training.batch_size=1", "training.gradient_accumulation_steps=4"], 22.00),
    (["training.gradient_checkpointing=true", "cuda.checkpointed_layers=4"], 35.47),
    (FOUR_ROWS + ["cuda.checkpointed_layers=24"], 26.07),
    (FOUR_ROWS + ["cuda.checkpointed_layers=18"], 38.11),
    (FOUR_ROWS + ["cuda.checkpointed_layers=16"], 42.13),
    (FOUR_ROWS + ["cuda.checkpointed_layers=24", "cuda.replay_dropout=false"], 34.16),
]
# 2026-12-07, one H100 80GB (bench/results/2026-12-07-h100-80gb-hbm3-2.json): the dropout kernels
MEASURED_PEAKS = [(overrides + ["cuda.dropout_kernel=false"], gb) for overrides, gb in TORCH_DROPOUT_PEAKS] + [
    ([], 38.07),  # the shipped config (30-step ablation run)
]


@pytest.mark.parametrize("overrides, measured", MEASURED_PEAKS)
def test_cuda_memory_model_is_within_five_percent_of_the_measurements(overrides, measured):
    predicted = cuda_peak_gb(load_config(platform="h100", overrides=overrides))
    assert abs(predicted - measured) / measured < 0.05


def h100(*overrides: str):
    """The H100 config with torch's dropout (the anchor was measured so), plus `overrides`."""
    return load_config(platform="h100", overrides=["cuda.dropout_kernel=false", *overrides])


def test_anchor_follows_the_config():
    shipped = anchor_rates(h100())
    assert shipped.peak_gb == 38.5 and "ESTIMATE" not in shipped.source  # the measured configuration
    synced = anchor_rates(h100("cuda.async_metrics=false"))
    torch_adamw = anchor_rates(h100("cuda.optimizer=adamw_torch"))
    assert synced.tokens_per_second == pytest.approx(shipped.tokens_per_second * 10447 / 10855)  # measured in one process
    assert torch_adamw.tokens_per_second == pytest.approx(shipped.tokens_per_second * 11122 / 10855)
    assert "ESTIMATE" in synced.source
    all_layers = anchor_rates(h100("cuda.checkpointed_layers=all"))
    assert all_layers.peak_gb < shipped.peak_gb - 25  # 31 layers x 2 rows of kept activations
    assert all_layers.tokens_per_second < shipped.tokens_per_second  # every layer recomputed
    assert "ESTIMATE" in all_layers.source and "H100" in all_layers.source
    no_rope = anchor_rates(h100("cuda.liger_kernels=[rms_norm,swiglu]"))
    assert no_rope.tokens_per_second == pytest.approx(shipped.tokens_per_second * 9926 / 10533)  # measured pair
    assert no_rope.peak_gb == pytest.approx(shipped.peak_gb, abs=0.5) and "ESTIMATE" in no_rope.source
    assert no_rope.startup_seconds == shipped.startup_seconds  # Liger's Triton RoPE compiles once, not per length
    no_dropout = anchor_rates(h100("lora.dropout=0"))
    assert no_dropout.tokens_per_second > shipped.tokens_per_second  # no masks to draw twice
    assert "ESTIMATE" in no_dropout.source and no_dropout.peak_gb == pytest.approx(shipped.peak_gb, abs=0.1)
    stored = anchor_rates(h100("cuda.replay_dropout=false"))
    assert stored.tokens_per_second == pytest.approx(no_dropout.tokens_per_second)  # masks drawn once...
    assert stored.peak_gb > shipped.peak_gb + 10  # ...and kept: 31 layers x 2 rows x 0.25 GB
    no_liger = anchor_rates(h100("cuda.use_liger=false"))
    assert no_liger.peak_gb > shipped.peak_gb + 5 and no_liger.tokens_per_second < shipped.tokens_per_second
    kernels = anchor_rates(load_config(platform="h100"))  # the shipped config: the dropout kernels
    assert kernels.tokens_per_second == pytest.approx(1 / (1 / shipped.tokens_per_second - (1 / 13216 - 1 / 14708)))
    assert kernels.tokens_per_second == pytest.approx(14708, rel=0.03)  # measured 2026-12-07 (another machine)
    assert "ESTIMATE" in kernels.source and kernels.peak_gb == pytest.approx(38.07, rel=0.02)


def test_memory_over_with_kept_activations_proposes_checkpointing_every_layer():
    cfg = load_config(platform="h100")
    plan = make_plan(cfg, [1000] * 10, [100], anchor_rates(cfg), 24, "m", (1.0, "x"))  # a 24 GB card
    assert not plan.fits
    assert any("--set cuda.checkpointed_layers=all saves ~30 GB" in a for a in plan.advice)
    no_checkpointing = load_config(platform="h100", overrides=["training.gradient_checkpointing=false",
                                                               "cuda.checkpointed_layers=all"])
    plan = make_plan(no_checkpointing, [1000] * 10, [100], anchor_rates(no_checkpointing), 24, "m", (1.0, "x"))
    assert any("--set training.gradient_checkpointing=true saves ~31 GB" in a for a in plan.advice)
    partly = load_config(platform="h100", overrides=["training.gradient_checkpointing=true", "cuda.checkpointed_layers=8"])
    plan = make_plan(partly, [1000] * 10, [100], anchor_rates(partly), 24, "m", (1.0, "x"))
    assert any("--set cuda.checkpointed_layers=all saves ~23 GB" in a for a in plan.advice)


def test_time_over_budget_proposes_epochs_or_a_subset():
    cfg = load_config(platform="h100")
    plan = make_plan(cfg, [1000] * 10_000, [500] * 100, RATES, 80, "m", (1.0, "x"), time_budget_s=1800)
    assert not plan.fits
    advice = " ".join(plan.advice)
    assert "training.epochs=" in advice and "of the data (a subset)" in advice and "--time-budget" in advice


def test_estimates_say_so():
    est = Rates(35, 11, 100, 5, 120, "estimate", measured=False)
    plan = make_plan(load_config(platform="m4"), [1000] * 10, [100], est, 22, "m", (1.0, "x"))
    assert any("--calibrate" in a for a in plan.advice)


def run(*args, home):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "commands", *args], capture_output=True, text=True, cwd=REPO, env=env)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_calibrate_on_the_cpu_then_reuse_the_cached_rates(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    common = ["--platform", "cpu", "--set", f"model.name_or_path={tiny_model_dir}",
              "--set", f"data.train_file={SAMPLE / 'train.jsonl'}", "--set", f"data.val_file={SAMPLE / 'val.jsonl'}"]
    code, out = run("plan", *common, home=tmp_path)
    assert code == 0 and "ESTIMATE" in out and "`qlora plan --calibrate` measures" in out
    code, out = run("plan", *common, "--calibrate", "--json", home=tmp_path)
    assert code == 0, out[-2000:]
    plan, _ = json.JSONDecoder().raw_decode(out[out.index("{\n"):])
    source = {f["name"]: f["source"] for f in plan["figures"]}["training time"]
    assert source.startswith("calibrated on CPU only")
    cache = json.loads((tmp_path / ".cache" / "mistral-qlora" / "calibration.json").read_text())
    (entry,) = cache.values()
    assert entry["tokens_per_second"] > 0 and entry["peak_gb"] > 0
    code, out = run("plan", *common, home=tmp_path)
    assert code == 0 and "calibrated on CPU only" in out  # reused, no new measurement


def test_a_calibration_is_reused_only_for_the_same_speed_settings(tmp_path):
    from common.plan.calibrate import cached_rates, store

    cache = tmp_path / "calibration.json"
    shipped = load_config(platform="h100")
    store(shipped, "NVIDIA H100 80GB HBM3 (80 GB)", RATES, cache=cache)
    assert cached_rates(shipped, "NVIDIA H100 80GB HBM3 (80 GB)", cache=cache) == RATES
    for change in ("cuda.checkpointed_layers=all", "cuda.fused_lora=false", "cuda.use_liger=false",
                   "training.batch_size=4", "cuda.replay_dropout=false", "cuda.liger_kernels=[rms_norm]",
                   "cuda.dropout_kernel=false", "lora.dropout=0", "cuda.optimizer=adamw_torch",
                   "cuda.async_metrics=false"):
        other = load_config(platform="h100", overrides=[change])
        assert cached_rates(other, "NVIDIA H100 80GB HBM3 (80 GB)", cache=cache) is None, change
    assert cached_rates(shipped, "NVIDIA H200 (140 GB)", cache=cache) is None


def test_memory_is_sized_from_the_datas_rows_not_max_seq_length():
    from common.plan.planner import row_tokens

    padded = load_config(platform="h100", overrides=["training.packing=false"])
    assert row_tokens(padded, [63, 40, 12]) == 63  # the sample's longest conversation
    assert row_tokens(load_config(platform="h100"), [63] * 1000) == 4096  # packed rows fill up
    assert row_tokens(load_config(platform="h100"), [63, 40]) == 103
    short, full = anchor_rates(padded, 63), anchor_rates(padded)
    assert short.peak_gb < 6 < full.peak_gb
    plan = make_plan(padded, [63, 40, 12], [30], short, 80, "m", (1.0, "x"))
    assert any(f.name == "longest row" and f.value == 63 for f in plan.figures)


def test_disk_for_the_demo_model_is_its_own_adapters_size_not_a_7b_one(tmp_path):
    """`qlora plan` on a fresh clone (demo model not built yet) said 2.19 GB of checkpoints for a
    tiny model whose adapter is a few hundred KB."""
    from common.config.loader import load_config
    from common.plan.preflight import disk_needed_gb

    demo = load_config(platform="cpu")
    total, parts = disk_needed_gb(demo, model_cached_or_local=True)
    assert total < 0.05, parts
    seven_b = load_config(platform="h100", overrides=[f"model.name_or_path={tmp_path / 'not-there'}"])
    assert disk_needed_gb(seven_b, model_cached_or_local=True)[0] > 1  # 7B-shaped adapters and Adam state


def test_disk_counts_the_frozen_reference_adapter_in_each_cuda_checkpoint_of_a_run_from_an_adapter(tmp_path):
    """One more adapter's fp32 weights per kept checkpoint (its `ref/` folder); not with the base as reference,
    not on MLX (whose checkpoints hold the trained adapter only)."""
    from common.config.loader import load_config
    from common.plan.preflight import disk_needed_gb

    def disk(*extra, platform="h100"):
        cfg = load_config(platform=platform, overrides=[f"model.name_or_path={tmp_path / 'not-there'}", *extra])
        return disk_needed_gb(cfg, model_cached_or_local=True)

    dpo = ("training.method=dpo", f"preference.from_adapter={tmp_path / 'sft'}")
    (sft, _), (start, detail) = disk(), disk(*dpo)
    adapter_gb, kept = 41_943_040 * 4 / 1024**3, 3 + 1  # 7B, r16 on the 7 projections; the best 3 and the newest
    assert start - sft == pytest.approx(kept * adapter_gb) and "frozen reference adapter" in detail
    assert disk(*dpo, "preference.reference=base")[0] == sft
    assert disk(*dpo, platform="m4")[0] == disk(platform="m4")[0]


def test_a_preference_micro_batch_is_sized_as_two_rows_per_pair_of_the_longer_answer():
    """DPO and ORPO run prompt + chosen and prompt + rejected for each pair: memory is sized for 2 x batch_size
    rows of the pair's longer side (not batch_size rows of both sides' total)."""
    from common.data.preference import PairExample
    from common.plan.planner import row_lengths

    sft = load_config(platform="h100", overrides=["training.batch_size=8"])
    for method in ("dpo", "orpo"):
        pairs = load_config(platform="h100", overrides=["training.batch_size=4", f"training.method={method}"])
        assert cuda_peak_gb(pairs, 2000) == pytest.approx(cuda_peak_gb(sft, 2000))
        assert cuda_peak_gb(pairs, 2000) > cuda_peak_gb(load_config(platform="h100", overrides=["training.batch_size=4"]), 2000)
    pair = PairExample(prompt_ids=[1] * 50, chosen_ids=[2] * 30, rejected_ids=[3] * 10)
    assert len(pair) == 140 and row_lengths([pair]) == [80]
    dpo = load_config(platform="h100", overrides=["training.method=dpo"])
    plan = make_plan(dpo, [140], [140], anchor_rates(dpo, 80), 80.0, "anchor", (1.0, "x"), train_rows=[80])
    assert figures(plan)["longest row"] == 80


# Steady real tokens/s measured on one H100 80GB on 2026-12-07 with the shipped long-context configs:
# with torch's dropout (bench/results/2026-12-07-h100-80gb-hbm3.json, 20-step runs) the planner's speed
# within 5% at each length and its peak within 2%; with the dropout kernels (...-2.json, 15-step runs on
# another machine) within 8% and 5% (the issue asks 10% of the peak).
MEASURED_LONG = [("training_config_h100_8k.yaml", False, 11_977, 38.48, 0.05, 0.02),
                 ("training_config_h100_16k.yaml", False, 11_115, 58.19, 0.05, 0.02),
                 ("training_config_h100_32k.yaml", False, 9_323, 55.80, 0.05, 0.02),
                 ("training_config_h100_8k.yaml", True, 12_387, 37.94, 0.08, 0.05),
                 ("training_config_h100_16k.yaml", True, 11_733, 57.10, 0.08, 0.05),
                 ("training_config_h100_32k.yaml", True, 10_103, 53.62, 0.08, 0.05)]


@pytest.mark.parametrize(("name", "kernels", "tokens_per_second", "peak_gb", "speed_tolerance", "peak_tolerance"),
                         MEASURED_LONG)
def test_long_rows_are_planned_as_measured(name, kernels, tokens_per_second, peak_gb, speed_tolerance, peak_tolerance):
    cfg = load_config(REPO / "configs" / name, overrides=[f"cuda.dropout_kernel={str(kernels).lower()}"])
    row = cfg.data.max_seq_length
    rates = anchor_rates(cfg, row, cfg.training.batch_size * row * 0.98)  # packed rows, 98% full
    assert rates.tokens_per_second == pytest.approx(tokens_per_second, rel=speed_tolerance)
    assert rates.peak_gb == pytest.approx(peak_gb, rel=peak_tolerance)


def test_preference_pairs_are_padded_as_trl_pads_them():
    """TRL pads every row of a micro-batch (each pair's prompt + chosen and prompt + rejected) to the
    longest one: 2 pairs whose longest rows are 100 and 300 tokens process 4 x 300 tokens, not 2 x the
    longer pair's both rows (the estimate before, which read less padding and a faster run)."""
    cfg = load_config(REPO / "configs" / "dpo_h100.yaml", overrides=["training.gradient_accumulation_steps=1"])
    pair_tokens, rows = [150, 500], [100, 300]  # each pair's two rows together, and its longer row
    assert steps_per_epoch(cfg, pair_tokens, rows) == (1, 4 * 300)
    assert steps_per_epoch(cfg, pair_tokens) == (1, 2 * 500)
    plan = make_plan(cfg, pair_tokens, [100], RATES, 80, "m", (1.0, "x"), train_rows=rows)
    assert figures(plan)["padding"] == pytest.approx(100 * (1 - 650 / 1200))


def test_padded_rows_are_not_the_measured_packed_anchor():
    """The anchor was measured on packed rows: the same layout padded is estimated from its micro-batch's
    tokens, whatever its longest example."""
    packed = h100()
    padded = h100("training.packing=false")
    assert anchor_rates(packed, 4096).measured and "ESTIMATE" not in anchor_rates(packed, 4096).source
    short_rows = anchor_rates(padded, 4096, micro_tokens=2 * 1000)  # 2 rows padded to ~1,000 tokens
    assert "ESTIMATE" in short_rows.source
    assert short_rows.tokens_per_second < anchor_rates(packed, 4096).tokens_per_second


def test_micro_batch_tokens_divide_by_micro_batches():
    """20 pairs, 2 a micro-batch, 8 micro-batches a step: 10 micro-batches in 2 steps (the second a
    remainder of 2), so a micro-batch is a tenth of the epoch's padded tokens, not a sixteenth."""
    from common.data.preference import PairExample
    from common.plan.planner import micro_batch_tokens

    cfg = load_config(REPO / "configs" / "dpo_h100.yaml")
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (2, 8)
    pairs = [PairExample(prompt_ids=[1] * 50, chosen_ids=[2] * 50, rejected_ids=[3] * 30) for _ in range(20)]
    assert micro_batch_tokens(cfg, pairs) == pytest.approx(2 * 2 * 100)  # 4 rows of the 100-token longest row


# DPO on one H100 80GB on 2026-12-07, ~650-token pairs from the bench's generators (bench/results/
# 2026-12-07-h100-80gb-hbm3.json): steady real tokens/s of three layouts; the plan reads at most 10% slower.
MEASURED_DPO = [(["cuda.checkpointed_layers=all", "training.batch_size=4", "training.gradient_accumulation_steps=4"], 4234),
                ([], 5284),  # the shipped layout: 2 pairs x 8, one layer checkpointed
                (["cuda.checkpointed_layers=16", "training.batch_size=4", "training.gradient_accumulation_steps=4"], 4834)]


def test_dpo_speed_is_planned_as_measured(tmp_path):
    bench = REPO / "bench"
    run = [sys.executable, str(bench / "make_chat_data.py"), "--kind", "chat", "--train", "400", "--val", "16",
           "--out", str(tmp_path / "src")]
    subprocess.run(run, check=True, capture_output=True)
    for split in ("train", "val"):
        subprocess.run([sys.executable, str(bench / "make_pairs.py"), str(tmp_path / "src" / f"{split}.jsonl"),
                        str(tmp_path / f"{split}.jsonl")], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for overrides, measured in MEASURED_DPO:
        sets = [f"data.train_file={tmp_path / 'train.jsonl'}", f"data.val_file={tmp_path / 'val.jsonl'}",
                "data.overlong=drop", "cuda.dropout_kernel=false", *overrides]  # measured with torch's dropout
        out = subprocess.run([sys.executable, "-m", "commands", "plan", "--config", str(REPO / "configs" / "dpo_h100.yaml"),
                              "--json", *[a for s in sets for a in ("--set", s)]],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        f = {x["name"]: x["value"] for x in json.loads(out.stdout)["figures"]}
        real_per_second = f["real tokens per epoch"] / (f["training time"] * 3600)  # one epoch: steps <= per epoch
        assert 0.9 * measured <= real_per_second <= 1.03 * measured, (overrides, real_per_second)
