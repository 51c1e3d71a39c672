"""One config, one data set, both backends (tiny model, CPU): what a user sees is the same.

The contract is common/trainer.py's docstring and docs/contract.md. The runs here use the base unquantized
in float32 on both sides, LoRA dropout 0 and the CUDA adapter started from the MLX one's initial weights
(through the shared converter), so they must also agree in numbers: the training loss step by step, the
eval losses and the final adapters' logits. bench/parity.py measures the same and the 4-bit bases' gap.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

pytest.importorskip("mlx_lm")
pytest.importorskip("trl")
sys.path.insert(0, str(REPO / "bench"))

import parity  # noqa: E402  (bench/parity.py: the runs both this suite and the benchmark make)

from common.adapters.conversion import read_safetensors  # noqa: E402
from common.run import checkpoints as ckpt  # noqa: E402
from common.run.summary import RunSummary, adapter_parameters, peak_rss_gb  # noqa: E402

STEPS = 20
# The numbers: 20 steps at bench/parity.py's learning rate (1e-2, cosine), where both backends' float32 runs
# stay within float rounding of each other
SETTINGS = [f"training.max_steps={STEPS}", "eval.eval_steps=4", "eval.save_steps=4", "eval.save_total_limit=2",
            *parity.UNQUANTIZED]
# The rules: a constant 3e-2 makes eval_loss go up and down (measured on both backends, sample data of
# 2026-12-07: 11.00, 10.11, 9.41, 8.79, 8.51, 8.55, 8.32, 8.25), so keeping the best 3 (5, 7, 8) differs from
# keeping the newest 3 and the best (6, 7, 8); the backends are still within 4e-4 of each other by step 8
BOUNCY_STEPS = 8
BOUNCY = [f"training.max_steps={BOUNCY_STEPS}", "eval.eval_steps=1", "eval.save_steps=1", "eval.save_total_limit=3",
          "training.lr_scheduler=constant_with_warmup", "training.warmup_ratio=0", "training.learning_rate=3e-2",
          *parity.UNQUANTIZED]
STOP_AT = 6  # a SIGTERM during this step: it finishes, then the run saves and stops (eval_loss: 5 < 6)
# Measured float32 gaps (bench/parity.py, docs/benchmarks.md, 2026-12-07): training loss <= 1.7e-5 over 20
# steps, final logits <= 1.6e-4; the tolerances leave room for other CPUs' summation orders.
LOSS_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-3
BACKENDS = ("cuda", "mlx")

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory):
    return parity.float32_copy(tiny_model_dir, tmp_path_factory.mktemp("fp32") / "tiny-fp32")


def pair(base, out, name, settings):
    """Both backends' trainers on one config, the CUDA adapter starting where the MLX one starts."""
    mlx = parity.trainer("mlx", base, out, f"{name}-mlx", *settings)
    cuda = parity.trainer("cuda", base, out, f"{name}-cuda", *settings)
    parity.start_like(cuda, mlx, out / f"{name}-initial")
    return {"cuda": cuda, "mlx": mlx}


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory):
    """An uninterrupted run on each backend, with the model card `qlora train` writes."""
    from common.run.training import describe_run

    trainers = pair(base, tmp_path_factory.mktemp("finished"), "finished", SETTINGS)
    summaries = {}
    for backend, trainer in trainers.items():
        summaries[backend] = trainer.train()
        describe_run(trainer.run, trainer.cfg, trainer.data, summaries[backend])
    return trainers, summaries


@pytest.fixture(scope="module")
def bouncy(base, tmp_path_factory):
    """An uninterrupted run whose eval_loss is not monotone, on each backend."""
    trainers = pair(base, tmp_path_factory.mktemp("bouncy"), "bouncy", BOUNCY)
    return trainers, {backend: trainer.train() for backend, trainer in trainers.items()}


@pytest.fixture(scope="module")
def resumed(base, tmp_path_factory):
    """The bouncy run on each backend: a SIGTERM while step STOP_AT runs, then `--resume auto` to the end."""
    out = tmp_path_factory.mktemp("stopped")
    trainers = pair(base, out, "stop", BOUNCY)
    send_sigterm_during_step(trainers, STOP_AT)
    stopped = {}
    for backend, trainer in trainers.items():
        summary = trainer.train()
        saved = {step: run_adapter(ckpt.folder_of(trainer.run.checkpoints, step)) for step in (STOP_AT - 1, STOP_AT)}
        stopped[backend] = (summary, run_adapter(trainer.run.root), lora_weights(trainer), saved)
    again = {b: parity.trainer(b, base, out, f"stop-{b}", *BOUNCY) for b in BACKENDS}
    return stopped, {b: t.train(resume="auto") for b, t in again.items()}, again


def send_sigterm_during_step(trainers, step: int) -> None:
    from transformers import TrainerCallback

    class Signal(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                os.kill(os.getpid(), signal.SIGTERM)

    trainers["cuda"].trainer.add_callback(Signal())
    mlx = trainers["mlx"]
    batches = mlx.step_micro_batches

    def in_flight():  # the MLX loop has no callbacks: the signal lands as the step's batches are drawn
        if mlx.step == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return batches()

    mlx.step_micro_batches = in_flight


def run_adapter(folder) -> dict[str, np.ndarray]:
    """LoRA weights of a PEFT adapter folder or of a checkpoint (either backend's own format), by
    (layer, projection, factor) in PEFT's orientation."""
    peft = folder / "adapter_model.safetensors"
    if peft.is_file():
        tensors = read_safetensors(peft)
        pattern = re.compile(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_([AB])\.weight$")
        return {m.groups(): v for k, v in tensors.items() if (m := pattern.search(k))}
    tensors = read_safetensors(folder / "adapters.safetensors")
    pattern = re.compile(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_([ab])$")
    return {(m[1], m[2], m[3].upper()): v.T for k, v in tensors.items() if (m := pattern.search(k))}


def lora_weights(trainer) -> dict:
    if trainer.cfg.backend == "mlx":
        from common.adapters.conversion import peft_tensors

        tensors = peft_tensors(trainer.adapter())
    else:
        tensors = {n: p.detach().float().numpy().copy() for n, p in trainer.trainer.model.named_parameters()
                   if p.requires_grad}
    pattern = re.compile(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")
    return {m.groups(): v for k, v in tensors.items() if (m := pattern.search(k))}


def same_weights(a: dict, b: dict, tolerance: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(np.abs(a[k] - b[k]).max() <= tolerance for k in a)


def metrics(trainer) -> list[dict]:
    return trainer.run.read_metrics()


def steps_with(trainer, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(trainer) if key in r}


# ------------------------------------------------------------------ the shared rules, by themselves


def test_retention_keeps_the_best_n_by_eval_loss_and_the_newest():
    losses = {4: 2.0, 8: 1.0, 12: 1.5, 16: 1.8, 20: 1.9}
    assert ckpt.kept_steps(sorted(losses), losses, 2) == {8, 12, 20}  # transformers kept 16, 20 and 8
    assert ckpt.kept_steps([4, 8, 12, 14], {4: 2.0, 8: 1.0, 12: 1.5}, 2) == {8, 12, 14}  # a stop checkpoint
    assert ckpt.kept_steps([4, 8], {4: 1.0, 8: 2.0}, 1) == {4, 8}  # the newest stays while a resume needs it
    assert ckpt.kept_steps([2, 4, 6, 8], {}, 3) == {4, 6, 8}  # no evaluations: the newest 3, never fewer
    assert ckpt.kept_steps([2, 4, 6], {6: 1.0}, 3) == {2, 4, 6}  # unevaluated ones fill the free places


def test_prune_ranks_checkpoints_by_the_eval_loss_their_manifests_record(tmp_path):
    def save(step, loss, old=False):
        folder = ckpt.folder_of(tmp_path, step)
        folder.mkdir()
        (folder / "weights").write_text(str(step))
        ckpt.write_manifest(folder, step, {}, ("weights",), 20, eval_loss=loss)
        if old:  # written before manifests recorded eval_loss
            record = ckpt.read_manifest(folder)
            del record["eval_loss"]
            (folder / ckpt.MANIFEST).write_text(json.dumps(record))
        return ckpt.prune(tmp_path, 2)

    save(2, None, old=True)
    for step, loss in ((4, 2.0), (8, 1.0), (12, 1.5), (16, 1.8)):
        save(step, loss)
    assert save(18, None) == {8, 12, 18}  # a stop checkpoint: kept as the newest
    assert [ckpt.step_of(p) for p in ckpt.numbered(tmp_path)] == [18, 12, 8, 2]  # the old one is never ranked
    assert ckpt.best(tmp_path) == ckpt.folder_of(tmp_path, 8)
    assert ckpt.final_weights(tmp_path, stopped=False, load_best=True) == ckpt.folder_of(tmp_path, 8)
    assert ckpt.final_weights(tmp_path, stopped=True, load_best=True) is None


def test_peak_memory_is_gib_on_linux_and_on_macos(monkeypatch):
    import resource

    class Usage:
        ru_maxrss = 3 * 1024**2  # 3 GiB in KiB (Linux) or 3 MiB in bytes (macOS)

    monkeypatch.setattr(resource, "getrusage", lambda who: Usage)
    monkeypatch.setattr(sys, "platform", "linux")
    assert peak_rss_gb() == 3.0
    monkeypatch.setattr(sys, "platform", "darwin")
    assert peak_rss_gb() == pytest.approx(3 / 1024)


# ------------------------------------------------------------------ evaluation


def token_weighted_loss(model, examples) -> float:
    """The eval set's loss by hand: each example alone through the model, the summed cross-entropy of its target
    tokens (position t predicts token t+1 where the loss mask marks it) over the count of all targets."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.tensor(example.input_ids[1:])
            weights = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            total, count = total + losses[weights].sum().item(), count + int(weights.sum())
    return total / count


@slow
def test_eval_loss_weighs_every_target_token_the_same_on_both_backends(base, tmp_path):
    """Eval batches of 3, 3 and 2 examples with unequal target counts: the mean of per-batch means (transformers'
    evaluation loop) is not the eval set's loss; both backends report the mean over all its target tokens."""
    trainers = pair(base, tmp_path, "eval", [*SETTINGS, "eval.eval_batch_size=3"])
    examples = trainers["cuda"].data.val
    batches = [examples[i:i + 3] for i in range(0, len(examples), 3)]
    targets = [sum(sum(e.loss_mask[1:]) for e in batch) for batch in batches]
    assert len(batches) == 3 and len(set(targets)) > 1, targets
    model = trainers["cuda"].trainer.model
    model.eval()
    expected = token_weighted_loss(model, examples)
    per_batch = [token_weighted_loss(model, batch) for batch in batches]
    batch_means = sum(m * len(b) for m, b in zip(per_batch, batches)) / len(examples)
    assert abs(batch_means - expected) > 50 * LOSS_TOLERANCE, (batch_means, expected)  # the test tells them apart
    losses = {backend: trainer.evaluate() for backend, trainer in trainers.items()}
    assert losses["cuda"] == pytest.approx(expected, abs=LOSS_TOLERANCE), (losses, expected, batch_means)
    assert losses["mlx"] == pytest.approx(expected, abs=LOSS_TOLERANCE), (losses, expected, batch_means)
    assert abs(losses["cuda"] - losses["mlx"]) <= LOSS_TOLERANCE


# ------------------------------------------------------------------ finished runs


@slow
def test_steps_logs_evaluations_and_saves_happen_at_the_same_steps(finished):
    trainers, summaries = finished
    for backend in BACKENDS:
        assert summaries[backend].global_step == summaries[backend].max_steps == STEPS
        assert sorted(steps_with(trainers[backend], "loss")) == list(range(1, STEPS + 1))
        assert sorted(steps_with(trainers[backend], "eval_loss")) == list(range(4, STEPS + 1, 4))
    records = {b: [(r["step"], sorted(k for k in r if k in ("loss", "eval_loss", "learning_rate")))
                   for r in metrics(trainers[b]) if "step" in r and ("loss" in r or "eval_loss" in r)]
               for b in BACKENDS}
    assert records["cuda"] == records["mlx"]


@slow
def test_the_learning_rate_at_every_logged_step_is_the_same(finished):
    trainers, _ = finished
    cuda, mlx = (steps_with(trainers[b], "learning_rate") for b in BACKENDS)
    assert cuda.keys() == mlx.keys() and len(cuda) == STEPS
    assert all(abs(cuda[s] - mlx[s]) <= 1e-9 + 1e-6 * cuda[s] for s in cuda), (cuda, mlx)


@slow
def test_the_kept_checkpoints_are_the_best_three_by_eval_loss_plus_the_newest(bouncy):
    trainers, _ = bouncy
    kept = {}
    for backend in BACKENDS:
        evals = steps_with(trainers[backend], "eval_loss")
        best_three = {s for _, s in sorted((loss, s) for s, loss in evals.items())[:3]}
        newest_three_and_best = set(sorted(evals)[-3:]) | {min(evals, key=evals.get)}  # transformers' rotation
        assert best_three | {BOUNCY_STEPS} != newest_three_and_best, f"{backend}: {evals} do not tell the rules apart"
        kept[backend] = {ckpt.step_of(p) for p in ckpt.numbered(trainers[backend].run.checkpoints)}
        assert kept[backend] == best_three | {BOUNCY_STEPS}, (backend, kept, evals)
    assert kept["cuda"] == kept["mlx"]


@slow
def test_a_finished_runs_adapter_is_its_best_checkpoints_weights(bouncy):
    trainers, summaries = bouncy
    for backend in BACKENDS:
        best = Path(summaries[backend].best_checkpoint)
        evals = steps_with(trainers[backend], "eval_loss")
        # with today's sample validation data the best is the last step (8.25 at 8): this checks the adapter
        # against the checkpoint the rule names, not (as with the earlier data) best weights != last weights
        assert ckpt.step_of(best) == min(evals, key=evals.get), backend
        assert same_weights(run_adapter(trainers[backend].run.root), run_adapter(best), 1e-7), backend


@slow
def test_training_losses_agree_step_by_step(finished):
    trainers, _ = finished
    cuda, mlx = (steps_with(trainers[b], "loss") for b in BACKENDS)
    assert len(cuda) == STEPS and cuda.keys() == mlx.keys()
    gaps = {s: abs(cuda[s] - mlx[s]) for s in cuda}
    assert max(gaps.values()) <= LOSS_TOLERANCE, gaps
    assert cuda[STEPS] < cuda[1] - 0.5  # they agree on a run that learns
    cuda_eval, mlx_eval = (steps_with(trainers[b], "eval_loss") for b in BACKENDS)
    assert all(abs(cuda_eval[s] - mlx_eval[s]) <= LOSS_TOLERANCE for s in cuda_eval)


@slow
def test_the_final_adapters_give_the_same_logits(finished, base):
    trainers, _ = finished
    gap = parity.final_logit_gap(base, trainers["cuda"].run.root, trainers["mlx"].run.root)
    assert gap <= LOGIT_TOLERANCE, gap


@slow
def test_summaries_agree_and_count_what_the_contract_says(finished):
    trainers, summaries = finished
    cuda, mlx = summaries["cuda"], summaries["mlx"]
    for field in ("global_step", "max_steps", "real_tokens", "interrupted", "stop_reason", "trainable_parameters"):
        assert getattr(cuda, field) == getattr(mlx, field), field
    expected_tokens = sum(len(e) for step in range(STEPS) for batch in trainers["mlx"].step_batches(step)
                          for e in batch)
    assert cuda.real_tokens == expected_tokens
    assert cuda.trainable_parameters == adapter_parameters(trainers["cuda"].run.root / "adapter_model.safetensors")
    assert cuda.trainable_parameters == sum(v.size for v in run_adapter(trainers["mlx"].run.root).values())
    for field in ("train_loss", "final_eval_loss", "best_eval_loss"):
        assert abs(getattr(cuda, field) - getattr(mlx, field)) <= LOSS_TOLERANCE, field
    assert os.path.basename(cuda.best_checkpoint) == os.path.basename(mlx.best_checkpoint)
    for summary in (cuda, mlx):
        assert 0 < summary.peak_memory_gb < 64  # GiB, not KiB or bytes read as KiB
        assert summary.tokens_per_second == pytest.approx(summary.real_tokens / summary.wall_seconds, rel=1e-6)
        assert RunSummary.read(trainers[summary.backend].run.root / "summary.json") == summary


@slow
def test_run_folders_hold_the_same_files(finished):
    trainers, _ = finished

    def listing(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                      if "checkpoints" not in p.relative_to(root).parts)

    assert listing(trainers["cuda"].run.root) == listing(trainers["mlx"].run.root)
    for backend in BACKENDS:
        config = json.loads((trainers[backend].run.root / "mlx" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(trainers[backend].cfg.model.name_or_path)


@slow
def test_model_cards_carry_the_same_fields(finished):
    trainers, _ = finished

    def fields(backend):
        text = (trainers[backend].run.root / "README.md").read_text()
        rows = re.findall(r"^\| ([^|]+) \|", text, flags=re.M)
        results = [re.sub(r"[\d.,]+|`[^`]*`|\S+-(cuda|mlx)\b", "#", line)
                   for line in text.split("## Results", 1)[1].split("## Files")[0].splitlines() if line.startswith("- ")]
        files = re.findall(r"^- `([^`]+)`", text.split("## Files", 1)[1], flags=re.M)
        return rows, results[:-1], files  # the last result line names the machine

    assert fields("cuda") == fields("mlx")


# ------------------------------------------------------------------ a stop, then a resume


@slow
def test_after_a_stop_the_adapter_holds_the_last_weights(resumed):
    stopped, _, _ = resumed
    for backend, (summary, adapter, weights, saved) in stopped.items():
        assert summary.interrupted and summary.stop_reason == "signal" and summary.global_step == STOP_AT, backend
        assert same_weights(adapter, weights, 1e-7), backend
        assert same_weights(adapter, saved[STOP_AT], 1e-7), backend
        # the best checkpoint (step 5) holds other weights: a stop never swaps them in
        assert ckpt.step_of(Path(summary.best_checkpoint)) == STOP_AT - 1, backend
        assert not same_weights(adapter, saved[STOP_AT - 1], 1e-6), backend


@slow
def test_a_resumed_run_sums_up_as_an_uninterrupted_one(resumed, bouncy):
    _, summaries, trainers = resumed
    uninterrupted, straight = bouncy
    for backend, summary in summaries.items():
        assert summary.resumed_from.endswith(f"checkpoint-{STOP_AT}"), backend
        assert [p.name for p in ckpt.numbered(trainers[backend].run.checkpoints)] == \
            [p.name for p in ckpt.numbered(uninterrupted[backend].run.checkpoints)], backend
        assert same_weights(run_adapter(trainers[backend].run.root),
                            run_adapter(uninterrupted[backend].run.root), 1e-6), backend
        for field in ("global_step", "real_tokens", "interrupted", "trainable_parameters"):
            assert getattr(summary, field) == getattr(straight[backend], field), (backend, field)
        assert abs(summary.train_loss - straight[backend].train_loss) <= LOSS_TOLERANCE, backend
        # the rate is this start's: the tokens of the steps after STOP_AT over this start's time
        since = summary.real_tokens - sum(len(e) for step in range(STOP_AT)
                                          for batch in trainers["mlx"].step_batches(step) for e in batch)
        assert summary.tokens_per_second == pytest.approx(since / summary.wall_seconds, rel=1e-6), backend
