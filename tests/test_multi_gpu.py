"""`qlora train --gpus N`: data-parallel through torchrun + DDP. On the CPU the same path runs N
gloo processes (cuda.device: cpu), so these tests drive the real launcher, ranks and Trainer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UsageError
from common.run import distributed
from common.run.checkpoints import numbered, problem
from tests.conftest import REPO, qlora, write_jsonl


def test_accumulation_is_split_first_then_the_micro_batch():
    assert distributed.split_batch(4, 4, 2) == distributed.BatchSplit(4, 2, 2)  # each GPU keeps its micro-batch
    assert distributed.split_batch(4, 1, 2) == distributed.BatchSplit(2, 1, 2)
    assert distributed.split_batch(3, 5, 1) == distributed.BatchSplit(3, 5, 1)
    assert distributed.split_batch(2, 2, 2) == distributed.BatchSplit(2, 1, 2)  # the H100 config on 2 GPUs
    assert distributed.split_batch(2, 2, 4) == distributed.BatchSplit(1, 1, 4)  # ...and on 4: both shrink
    assert distributed.split_batch(4, 4, 8) == distributed.BatchSplit(2, 1, 8)
    line = distributed.split_batch(2, 2, 4).line(2, 2)
    assert "by micro-batch and gradient accumulation: 1 x 1 on each, 4 rows a step as on one GPU" in line


def test_a_batch_that_cannot_be_split_is_refused_naming_both_values():
    with pytest.raises(UsageError) as refused:
        distributed.split_batch(3, 5, 2)
    message = str(refused.value)
    assert "training.batch_size 3" in message and "training.gradient_accumulation_steps 5" in message
    assert "--gpus 2" in message


def test_an_impossible_split_is_refused_before_anything_starts(tmp_path):
    code, out = qlora("train", "--platform", "cpu", "--gpus", "3", "--set", f"tracking.output_dir={tmp_path}")
    assert code != 0 and "cannot be split evenly over 3 GPUs" in out and "Traceback" not in out
    assert not any(tmp_path.iterdir()) and "launching" not in out


def test_gpus_all_counts_the_gpus_and_more_than_there_are_is_refused():
    assert distributed.requested_ranks("all", on_cpu=False, count_gpus=lambda: 8) == 8
    with pytest.raises(UsageError, match="lists 2 GPU"):
        distributed.requested_ranks("4", on_cpu=False, count_gpus=lambda: 2)
    with pytest.raises(UsageError, match="no GPU"):
        distributed.requested_ranks("all", on_cpu=False, count_gpus=lambda: 0)
    with pytest.raises(UsageError, match="give a number"):
        distributed.requested_ranks("two", on_cpu=True)
    assert distributed.requested_ranks("2", on_cpu=True) == 2  # CPU processes: nothing to count


def test_each_rank_runs_the_same_command_without_gpus():
    command = distributed.torchrun_command(2, ["train", "--gpus", "2", "--platform", "cpu", "--gpus=2", "-v"])
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in command
    assert command[command.index("commands") - 1:] == ["-m", "commands", "train", "--platform", "cpu", "-v"]


def test_mlx_refuses_gpus_with_a_reason(tmp_path):
    code, out = qlora("train", "--platform", "m4", "--gpus", "2", "--set", f"tracking.output_dir={tmp_path}")
    assert code != 0 and "--gpus is for the CUDA backend" in out and "Traceback" not in out


def test_the_first_failure_is_reported_once(tmp_path):
    (tmp_path / "rank-1.failed").write_text("OutOfMemoryError: CUDA out of memory\n")
    os.utime(tmp_path / "rank-1.failed", ns=(1, 1))
    (tmp_path / "rank-0.failed").write_text("RuntimeError: connection closed by peer\n")  # what followed
    assert distributed.first_failure(tmp_path) == (
        "process 1 failed first, which stopped the others: OutOfMemoryError: CUDA out of memory")
    (tmp_path / "rank-0.error").write_text("data.train_file: file not found\n")  # ours: said as it is
    assert distributed.first_failure(tmp_path) == "data.train_file: file not found"


TORCHRUN_ROOT_CAUSE = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
commands FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : {other_time}
  host      : localhost
  rank      : {other} (local_rank: {other})
  exitcode  : -9 (pid: 1381)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_20:38:27
  host      : localhost
  rank      : {root} (local_rank: {root})
  exitcode  : 1 (pid: 1380)
============================================================
"""


def test_a_crash_in_rank_0_is_printed_and_the_stopped_ranks_are_not_blamed(tmp_path):
    """Seen on two H100s (2026-11-27): rank 0 crashed in a Triton kernel, torchrun then killed rank 1,
    and the launcher printed only "process(es) 1 ended without a report" (rank 0's own message is
    on its stderr, which is torchrun's log)."""
    crash = "ValueError: Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)"
    later = "2026-11-27_20:38:57"
    (tmp_path / "rank-0.failed").write_text(crash + "\n")
    (tmp_path / "torchrun.log").write_text(TORCHRUN_ROOT_CAUSE.format(root=0, other=1, other_time=later))
    assert distributed.root_cause(tmp_path) == 0
    assert distributed.first_failure(tmp_path, silent=[1]) == (
        f"process 0 failed first, which stopped the others: {crash}")
    # a killed rank that torchrun names as the root cause: the others' errors followed from it
    (tmp_path / "torchrun.log").write_text(TORCHRUN_ROOT_CAUSE.format(root=1, other=0, other_time=later))
    assert distributed.first_failure(tmp_path, silent=[1]) is None
    # both in the same second: torchrun names the lowest rank, which says nothing; nor does no word at
    # all. The report is printed without claiming it came first
    for log in (TORCHRUN_ROOT_CAUSE.format(root=0, other=1, other_time="2026-11-27_20:38:27"), ""):
        (tmp_path / "torchrun.log").write_text(log)
        assert distributed.root_cause(tmp_path) is None
        assert distributed.first_failure(tmp_path, silent=[1]) == f"process 0 failed: {crash}"


def test_the_launcher_blames_a_silent_process_only_when_it_may_have_gone_first(tmp_path, monkeypatch):
    """What the terminal shows after a failed --gpus 2 run: the first failure, and the processes that
    left no report either as stopped after it or as killed."""
    import subprocess as sp

    from common.console import Say

    crash = "ValueError: Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)"

    class Torchrun:  # the ranks' reports appear in the launcher's folder; torchrun exits 1
        def __init__(self, command, env, **kwargs):
            folder = Path(env[distributed.RANK_DIR])
            (folder / "rank-0.pid").write_text("1")
            (folder / "rank-1.pid").write_text("2")
            (folder / "rank-0.failed").write_text(crash + "\n")
            kwargs["stderr"].write(self.log)

        def wait(self):
            return 1

    monkeypatch.setattr(distributed, "torchrun_command", lambda ranks, argv: ["torchrun"])
    for log, blamed in ((TORCHRUN_ROOT_CAUSE.format(root=0, other=1, other_time="2026-11-27_20:38:57"), False),
                        (TORCHRUN_ROOT_CAUSE.format(root=0, other=1, other_time="2026-11-27_20:38:27"), True)):
        Torchrun.log = log
        monkeypatch.setattr(sp, "Popen", Torchrun)
        lines: list[str] = []
        say = Say()
        monkeypatch.setattr(say, "error", lambda text, lines=lines: lines.append("error: " + text))
        monkeypatch.setattr(say, "info", lambda text, lines=lines: lines.append("info: " + text))
        assert distributed.launch(2, ["train"], say, 0.0) == 1
        assert any(crash in line and line.startswith("error: process 0 failed") for line in lines), lines
        assert any("ended without a report" in line for line in lines) == blamed, lines
        assert any("were stopped after that" in line for line in lines) != blamed, lines


# ------------------------------------------------------------------ training on two gloo processes


def tiny_run(model, data, out, run, *extra) -> list[str]:
    """Global batch 2 x 2 over 8 examples, dropout 0: one process and two see the same examples in
    each optimizer step (the same seeded order, split by rows) and sum the same per-token losses,
    only in another order."""
    return ["train", "--platform", "cpu", "--data", str(data / "train.jsonl"), "--val-data", str(data / "val.jsonl"),
            "--run-name", run, "--set", f"model.name_or_path={model}", "--set", f"tracking.output_dir={out}",
            "--set", "tracking.report_to=none", "--set", "lora.dropout=0", "--set", "training.packing=false",
            "--set", "training.batch_size=2", "--set", "training.gradient_accumulation_steps=2",
            "--set", "eval.logging_steps=1", "--set", "eval.load_best_model_at_end=false", *extra]


@pytest.fixture
def tiny_data(tmp_path):
    lines = (REPO / "data" / "sample" / "train.jsonl").read_text().splitlines()
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", lines[:8])
    write_jsonl(data / "val.jsonl", lines[8:10])
    return data


def lora_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one(tiny_model_dir, tiny_data, tmp_path):
    steps = ["--set", "training.max_steps=4", "--set", "eval.eval_steps=4", "--set", "eval.save_steps=4"]
    code, out = qlora(*tiny_run(tiny_model_dir, tiny_data, tmp_path, "one", *steps))
    assert code == 0, out
    code, out = qlora(*tiny_run(tiny_model_dir, tiny_data, tmp_path, "two", *steps), "--gpus", "2")
    assert code == 0, out
    assert "split over 2 processes by gradient accumulation: 2 x 1 on each" in out
    assert out.count("✔ done: 4 steps") == 1  # only rank 0 prints
    one, two = lora_weights(tmp_path / "one"), lora_weights(tmp_path / "two")
    moved = max(one[k].abs().max().item() for k in one if "lora_B" in k)  # B starts at zero
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["details"]["processes"] == 2 and summary["global_step"] == 4
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged.count(1) == 1  # one writer
    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint-4"
    assert problem(checkpoint) is None and {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize(("packing", "val_examples", "length"), [(False, 5, 512), (True, 11, 64)],
                         ids=["padded", "padding-free"])
def test_two_processes_measure_the_eval_loss_of_one_on_an_uneven_eval_set(
        tiny_model_dir, tmp_path, packing, val_examples, length):
    """Eval batches of 2 on 2 processes over an eval set of 5 rows: in the last round accelerate gives
    process 0 rows [4, 0] and process 1 rows [1, 2], repeating 3 rows only to even out the batches. Each
    example must count once, as on one process (they counted again: 2 processes read 11.7865 where one reads 11.7112). Packed, the
    11 examples make 7 packs of at most 64 tokens, process 1 gets [6, 0], and each batch is flattened into
    one row. One step, on the same examples in both runs; batches of another shape round differently in
    bf16 (2e-5 apart here)."""
    lines = (REPO / "data" / "sample" / "train.jsonl").read_text().splitlines()
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", lines[:8])
    write_jsonl(data / "val.jsonl", lines[8:8 + val_examples])
    steps = ["--set", "training.max_steps=1", "--set", "eval.eval_steps=1", "--set", "eval.save_steps=1",
             "--set", "eval.eval_batch_size=2", "--set", f"training.packing={str(packing).lower()}",
             "--set", f"data.max_seq_length={length}"]
    losses = {}
    for run, gpus in (("one", []), ("two", ["--gpus", "2"])):
        code, out = qlora(*tiny_run(tiny_model_dir, data, tmp_path, run, *steps), *gpus)
        assert code == 0, out
        losses[run] = json.loads((tmp_path / run / "summary.json").read_text())["final_eval_loss"]
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-4), losses


@pytest.mark.slow
@pytest.mark.parametrize(("packing", "train_examples", "steps"), [(False, 6, 4), (True, 9, 4), (True, 10, 2)],
                         ids=["padded", "padding-free", "padding-free-own-row-and-repeat"])
def test_two_processes_train_on_the_examples_of_one_when_the_last_step_is_short(
        tiny_model_dir, tmp_path, packing, train_examples, steps):
    """Global batch 2 x 2 over a training set that does not fill an epoch's last step: accelerate fills every
    process's last batch of the epoch with the epoch's first examples again, and those repeats must not be
    trained on. Padded, 6 examples: the second step gives process 0 rows [4, 5] and process 1 rows [0, 1]
    again (before: step 2 read 12.2550 on one process, 12.0455 on two). Packed at 64 tokens, 9 examples make
    6 packs, the same split, each batch flattened into one row. There one process and two run batches of the
    same shapes, so over 2 epochs (each in its own order) they log the same losses and reach the same weights.
    10 examples make 7 packs: process 1's last batch is [6, 0] of the epoch's order, its own pack's tokens
    followed by a repeat's. Its step-2 loss must be one process's; the weights are not compared, as a
    row of another length rounds differently in the bf16 backward pass (4e-4 apart by step 4)."""
    lines = (REPO / "data" / "sample" / "train.jsonl").read_text().splitlines()
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", lines[:train_examples])
    write_jsonl(data / "val.jsonl", lines[10:12])
    settings = ["--set", f"training.max_steps={steps}", "--set", f"eval.eval_steps={steps}",
                "--set", f"eval.save_steps={steps}", "--set", f"training.packing={str(packing).lower()}",
                "--set", f"data.max_seq_length={64 if packing else 512}"]
    losses, weights = {}, {}
    for run, gpus in (("one", []), ("two", ["--gpus", "2"])):
        code, out = qlora(*tiny_run(tiny_model_dir, data, tmp_path, run, *settings), *gpus)
        assert code == 0, out
        logged = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        losses[run] = [m["loss"] for m in logged if "loss" in m]
        weights[run] = lora_weights(tmp_path / run)
    assert len(losses["one"]) == steps and losses["two"] == pytest.approx(losses["one"], rel=1e-5), losses
    if steps == 4:
        diff = max((weights["one"][k] - weights["two"][k]).abs().max().item() for k in weights["one"])
        assert diff < 1e-5, diff


def two_processes_until(args, marker: str, act):
    """`qlora ARGS --gpus 2` until a line holds `marker`, then `act(proc)`; its whole output after that."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "QLORA_PLATFORM": "", "QLORA_CONFIG": ""}
    proc = subprocess.Popen([sys.executable, "-m", "commands", *args, "--gpus", "2"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            act(proc)
            break
    seen += proc.stdout.readlines()
    return proc, "".join(seen)


@pytest.mark.slow
def test_sigterm_stops_both_processes_with_one_checkpoint_and_one_process_continues(
        tiny_model_dir, tiny_data, tmp_path):
    steps = ["--set", "training.max_steps=12", "--set", "eval.eval_steps=12", "--set", "eval.save_steps=12"]
    args = tiny_run(tiny_model_dir, tiny_data, tmp_path, "stop", *steps)
    # to the launcher, as `kill` or a scheduler would
    proc, out = two_processes_until(args, " step 2/12", lambda proc: proc.send_signal(signal.SIGTERM))
    assert proc.wait(timeout=300) == 0, out
    assert "stopped early" in out and "--gpus 2" in out  # the command to continue names the GPU count
    checkpoints = numbered(tmp_path / "stop" / "checkpoints")
    assert len(checkpoints) == 1 and problem(checkpoints[0]) is None, out
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < 12
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["interrupted"] and summary["global_step"] == stopped_at

    # the same run continues on one process, from that checkpoint (which holds one RNG state per rank),
    # and ends where a run on one process all along ends
    code, out = qlora(*args, "--resume", "auto")
    assert code == 0 and "done: 12 steps" in out, out
    assert "was saved by 2 process(es) and this run has 1" in out
    code, out = qlora(*tiny_run(tiny_model_dir, tiny_data, tmp_path, "straight", *steps))
    assert code == 0, out
    resumed, expected = lora_weights(tmp_path / "stop"), lora_weights(tmp_path / "straight")
    assert max((resumed[k] - expected[k]).abs().max().item() for k in expected) < 1e-5


STOP_DECISION = """
import json
import torch.distributed as dist
from common.run import distributed

distributed.start(on_cpu=True)
group = distributed._stop_group
print(json.dumps({"own_gloo_group": group is not None and group != dist.group.WORLD and dist.get_backend(group) == "gloo",
                  "one_of_two": distributed.any_rank(dist.get_rank() == 1), "neither": distributed.any_rank(False)}))
distributed.stop()  # as as_rank does after a rank's work: gloo's threads end before the interpreter does
assert not dist.is_initialized() and distributed._stop_group is None
"""


def test_the_stop_decision_goes_through_a_gloo_group_of_its_own(tmp_path):
    """Beside NCCL the stop flag must not be a GPU tensor (reading it back waits for the whole step's
    kernels, every step): start() makes a gloo group for it, on the CPU as on GPUs, so this is the
    path a GPU host runs. Two real processes; rank 1 alone asks to stop."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    base = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", STOP_DECISION], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outs
    answers = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert answers == [{"own_gloo_group": True, "one_of_two": True, "neither": False}] * 2, outs


def pid_of_rank(proc, wanted: str) -> int:
    return next(p for p in descendants(proc.pid) if rank_of(p) == wanted)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the ranks through /proc (Linux)")
def test_a_signal_to_one_process_stops_both_after_the_same_step_and_the_run_resumes(
        tiny_model_dir, tiny_data, tmp_path):
    """The time budget or a signal can reach one rank alone (each measures its own budget): the
    others learn it from the stop decision after that step, and all save one checkpoint together."""
    steps = ["--set", "training.max_steps=8", "--set", "eval.eval_steps=8", "--set", "eval.save_steps=8"]
    args = tiny_run(tiny_model_dir, tiny_data, tmp_path, "one-stops", *steps)
    proc, out = two_processes_until(args, " step 2/8", lambda proc: os.kill(pid_of_rank(proc, "1"), signal.SIGTERM))
    assert proc.wait(timeout=300) == 0, out
    checkpoints = numbered(tmp_path / "one-stops" / "checkpoints")
    assert len(checkpoints) == 1 and problem(checkpoints[0]) is None, out
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoints[0].iterdir()}
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < 8
    assert f"stopped early at step {stopped_at} (another process stopped)" in out, out  # rank 0 got no signal
    summary = json.loads((tmp_path / "one-stops" / "summary.json").read_text())
    assert summary["interrupted"] and summary["global_step"] == stopped_at

    code, out = qlora(*args, "--gpus", "2", "--resume", "auto")
    assert code == 0 and "done: 8 steps" in out, out
    summary = json.loads((tmp_path / "one-stops" / "summary.json").read_text())
    assert summary["resumed_from"].endswith(checkpoints[0].name) and summary["global_step"] == 8


@pytest.mark.slow
def test_an_error_on_every_process_reaches_the_user_once(tiny_model_dir, tmp_path):
    code, out = qlora("train", "--platform", "cpu", "--gpus", "2", "--data", str(tmp_path / "missing.jsonl"),
                      "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"tracking.output_dir={tmp_path}")
    assert code == 1 and "Traceback" not in out, out
    assert out.count("missing.jsonl: file not found") == 1 and out.count("preflight found blocking problems") == 1


# ------------------------------------------------------------------ qlora plan --gpus


def test_the_allreduce_is_the_lora_gradients_and_costs_little_next_to_a_step():
    from common.config.loader import load_config
    from common.plan.planner import (
        STEP_FIXED_S,
        Rates,
        allreduce_seconds,
        data_parallel_rates,
        lora_parameters,
    )

    cfg = load_config(None, "h100", [])
    assert lora_parameters(cfg) == 41_943_040  # r 16 on the 7 projections of 32 layers: 168 MB in fp32
    assert allreduce_seconds(cfg, 2, "PCIe") > allreduce_seconds(cfg, 2, "NVLink") > 0
    one = Rates(12_805, 38.5, 20_000, 1.0, 60.0, "measured", True)
    # the measurement it comes from: 2 NVLinked H100s, 2 x 2 -> 2 x 1 on each, 12,805 -> 23,026 real
    # tokens/s (1.80x); planned per GPU: micro-batch 2, accumulation 1 on each of 2 (commands/plan.py)
    two_cfg = load_config(None, "h100", ["training.gradient_accumulation_steps=2"])
    two = data_parallel_rates(two_cfg, one, 2, tokens_per_step=16_042, link="NVLink")
    assert two.tokens_per_second == pytest.approx(23_026, rel=0.01)
    assert not two.measured and "measured on 2 NVLinked H100s" in two.source and "168 MB" in two.source
    pcie = data_parallel_rates(two_cfg, one, 2, tokens_per_step=16_042)  # the default: the slower link
    assert 22_000 < pcie.tokens_per_second < two.tokens_per_second and "ESTIMATE" in pcie.source
    # 8 GPUs each at the one-GPU layout (2 x 2, a 32-row global batch): each GPU's step is the measured
    # one-GPU step (1.274 s) plus a larger all-reduce
    eight_cfg = load_config(None, "h100", ["training.gradient_accumulation_steps=16"])
    eight = data_parallel_rates(eight_cfg, one, 8, tokens_per_step=8 * 16_042, link="NVLink")
    assert 8 * 16_042 / eight.tokens_per_second == pytest.approx(16_042 / 12_805, rel=0.01)
    # a micro-batch far shorter than the fixed cost: a step is never less than that cost
    tiny = data_parallel_rates(two_cfg, one, 2, tokens_per_step=256, link="NVLink")
    assert 256 / tiny.tokens_per_second >= STEP_FIXED_S
    # another platform: the fixed cost as the same share of a step (not the H100's seconds)
    cpu_cfg = load_config(None, "cpu", ["training.gradient_accumulation_steps=2", "training.batch_size=2"])
    slow = Rates(500, 1.0, 1_000, 1.0, 10.0, "measured", True)
    on_cpu = data_parallel_rates(cpu_cfg, slow, 2, tokens_per_step=4_000, link="NVLink")
    assert on_cpu.tokens_per_second / (2 * slow.tokens_per_second) == pytest.approx(1.798 / 2, rel=0.01)


def test_plan_for_two_gpus_splits_the_step_and_sizes_memory_per_gpu():
    data = ["--platform", "h100", "--data", str(REPO / "data/sample/train.jsonl"), "--json"]
    four_rows = ["--set", "training.batch_size=4", "--set", "training.gradient_accumulation_steps=1",
                 "--set", "cuda.checkpointed_layers=all"]
    plans = {}
    for name, extra in (("one", []), ("two", ["--gpus", "2"]), ("one-4x1", four_rows), ("two-4x1", [*four_rows, "--gpus", "2"])):
        code, out = qlora("plan", *data, *extra)
        assert code == 0, out
        plans[name] = {f["name"]: f for f in json.JSONDecoder().raw_decode(out[out.index("{"):])[0]["figures"]}

    one, two = plans["one"], plans["two"]
    # the shipped 2 x 2 runs 2 x 1 on each GPU: the same micro-batch, so the same memory per GPU
    assert two["peak memory"]["value"] == pytest.approx(one["peak memory"]["value"])
    assert two["training time"]["value"] < one["training time"]["value"]
    assert "ESTIMATE" in two["training time"]["source"]
    assert two["optimizer steps"]["value"] == one["optimizer steps"]["value"]
    # 4 x 1 runs 2 x 1 on each GPU: half the micro-batch, less memory per GPU
    assert plans["two-4x1"]["peak memory"]["value"] < plans["one-4x1"]["peak memory"]["value"]


def descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


def rank_of(pid: int) -> str | None:
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    return next((v[5:].decode() for v in env if v.startswith(b"RANK=")), None)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the ranks through /proc (Linux)")
def test_a_killed_process_stops_the_other_with_a_clear_message(tiny_model_dir, tiny_data, tmp_path):
    args = tiny_run(tiny_model_dir, tiny_data, tmp_path, "killed", "--set", "training.max_steps=200",
                    "--set", "eval.eval_steps=200", "--set", "eval.save_steps=200")

    def kill_rank_1(proc):  # as the out-of-memory killer would
        os.kill(pid_of_rank(proc, "1"), signal.SIGKILL)

    proc, out = two_processes_until(args, " step 2/200", kill_rank_1)
    assert proc.wait(timeout=150) != 0, out
    assert "process(es) 1 ended without a report" in out and "Traceback" not in out, out
    assert out.count("✘") <= 2, out  # rank 0's own line (its collective failed) and the launcher's


def test_each_process_checks_its_own_gpu(monkeypatch):
    from common.plan import machine

    asked = []

    def smi(cmd):
        asked.append(cmd)
        return "NVIDIA H100 80GB HBM3, 81559, 80000, 9.0, 580.159.04\n" if "--query-gpu=name,memory.total," \
            "memory.free,compute_cap,driver_version" in cmd else ""

    assert machine.probe_nvidia(smi) and "-i" not in asked[0]  # one process: the first GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    machine.probe_nvidia(smi)
    assert asked[-2][1:3] == ["-i", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    machine.probe_nvidia(smi)
    assert asked[-2][1:3] == ["-i", "5"]  # the second visible GPU is the machine's GPU 5
    assert machine.gpu_count(lambda cmd: "0\n1\n2\n") == 3 and machine.gpu_count(lambda cmd: None) == 0


def test_a_torchrun_without_shutdown_timeout_is_not_given_it(monkeypatch):
    """torch 2.11's torchrun refuses --shutdown_timeout and starts nothing (seen on two H100s)."""
    monkeypatch.setattr(distributed, "torchrun_accepts", lambda option: False)
    assert not any("shutdown" in part for part in distributed.torchrun_command(2, ["train", "--gpus", "2"]))


def test_the_torchrun_probe_tells_known_from_unknown_options():
    assert distributed.torchrun_accepts("--nproc_per_node=2")
    assert not distributed.torchrun_accepts("--no_such_option=1")


def test_torchrun_failing_to_start_is_said_in_its_own_words(monkeypatch, tmp_path):
    from tests.conftest import Recorder

    said = "run.py: error: unrecognized arguments: --shutdown_timeout=120"
    monkeypatch.setattr(distributed, "torchrun_command", lambda ranks, argv: [
        sys.executable, "-c", f"import sys; sys.stderr.write({said!r} + '\\n'); sys.exit(2)"])
    say = Recorder()
    assert distributed.launch(2, ["train"], say, 0.0) == 2
    errors = [message for kind, message in say.lines if kind == "error"]
    assert errors == [f"torchrun could not start the 2 processes: {said}"]  # not "killed by the OOM killer"


def test_one_process_on_a_machine_with_several_gpus_uses_the_first(monkeypatch):
    """Otherwise transformers wraps the model in nn.DataParallel, which TRL refuses (seen on two H100s)."""
    from common.config.loader import load_config
    from common.plan import machine
    from common.run.distributed import one_gpu
    from tests.conftest import Recorder

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(machine, "gpu_count", lambda: 2)
    say = Recorder()
    with one_gpu(load_config(platform="h100"), say):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and "training on GPU 0" in say.text()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the user's choice stands
    with one_gpu(load_config(platform="h100"), say):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_resume_in_the_middle_of_a_later_epoch_continues_as_the_run_that_went_on(
        tiny_model_dir, tiny_data, tmp_path, processes):
    """8 examples at a global batch of 4 make 2 steps an epoch; a resume at step 3 is one step into epoch 1.
    accelerate's skip_first_batches wraps the sampler one level deeper than its set_epoch reaches on several
    processes, so the resumed epoch replayed epoch 0's order (different examples than the run that went on)."""
    steps = ["--set", "training.max_steps=6", "--set", "eval.eval_steps=3", "--set", "eval.save_steps=3",
             "--set", "eval.save_total_limit=3"]
    args = tiny_run(tiny_model_dir, tiny_data, tmp_path, "straight", *steps)
    gpus = ["--gpus", "2"] if processes == 2 else []
    code, out = qlora(*args, *gpus)
    assert code == 0, out
    run = tmp_path / "straight"
    straight = lora_weights(run)
    straight_losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                       if "loss" in json.loads(line)]
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    for finished in ("adapter_model.safetensors", "summary.json"):  # as if stopped right after checkpoint-3
        (run / finished).unlink()
    code, out = qlora(*args, *gpus, "--resume", "auto")
    assert code == 0 and "done: 6 steps" in out, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3"), summary
    resumed_losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    after = {m["step"]: m["loss"] for m in resumed_losses if "loss" in m and m["step"] > 3}
    assert [after[s] for s in (4, 5, 6)] == pytest.approx(straight_losses[3:6], rel=1e-5), (after, straight_losses)
    resumed = lora_weights(run)
    assert max((resumed[k] - straight[k]).abs().max().item() for k in straight) < 1e-5


# ------------------------------------------------------------------ preference tuning on two gloo processes


def pair_data(tmp_path, train_pairs: int, val_pairs: int) -> Path:
    lines = (REPO / "data" / "sample" / "pairs_train.jsonl").read_text().splitlines()
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", lines[:train_pairs])
    write_jsonl(data / "val.jsonl", lines[train_pairs:train_pairs + val_pairs])
    return data


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_two_processes_train_on_the_pairs_of_one_when_the_last_step_is_short(tiny_model_dir, tmp_path, method):
    """Global batch 2 x 2 over 6 pairs: each epoch's second step holds pairs 4 and 5 alone, and accelerate
    fills process 1's batch with the epoch's first 2 pairs again. DPO's loss is a mean over the step's pairs
    (ORPO's: that, plus the chosen answers' token-weighted NLL): the repeats must count for nothing, in the
    loss and in the gradient. Over 2 epochs one process and two log the same losses and reach the same
    weights."""
    data = pair_data(tmp_path, 6, 2)
    settings = ["--set", f"training.method={method}", "--set", "training.max_steps=4", "--set", "eval.eval_steps=4",
                "--set", "eval.save_steps=4", "--set", "data.max_seq_length=256", "--set", "training.warmup_ratio=0"]
    losses, margins, weights = {}, {}, {}
    for run, gpus in (("one", []), ("two", ["--gpus", "2"])):
        code, out = qlora(*tiny_run(tiny_model_dir, data, tmp_path, run, *settings), *gpus)
        assert code == 0, out
        logged = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        losses[run] = [m["loss"] for m in logged if "loss" in m]
        margins[run] = [m["rewards/margins"] for m in logged if "loss" in m]
        weights[run] = lora_weights(tmp_path / run)
    assert len(losses["one"]) == 4 and losses["two"] == pytest.approx(losses["one"], rel=1e-5), losses
    assert margins["two"] == pytest.approx(margins["one"], rel=1e-4, abs=1e-6), margins
    moved = max(weights["one"][k].abs().max().item() for k in weights["one"] if "lora_B" in k)
    diff = max((weights["one"][k] - weights["two"][k]).abs().max().item() for k in weights["one"])
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_two_processes_measure_the_eval_loss_of_one_on_an_uneven_pair_set(tiny_model_dir, tmp_path, method):
    """Eval batches of 2 pairs on 2 processes over 5 held-out pairs: in the last round process 0 gets pairs
    [4, 0] and process 1 [1, 2], 3 of them repeats. Each pair counts once, as on one process."""
    data = pair_data(tmp_path, 4, 5)
    settings = ["--set", f"training.method={method}", "--set", "training.max_steps=1", "--set", "eval.eval_steps=1",
                "--set", "eval.save_steps=1", "--set", "eval.eval_batch_size=2", "--set", "data.max_seq_length=256",
                "--set", "training.warmup_ratio=0", "--set", "training.learning_rate=2e-2"]
    results = {}
    for run, gpus in (("one", []), ("two", ["--gpus", "2"])):
        code, out = qlora(*tiny_run(tiny_model_dir, data, tmp_path, run, *settings), *gpus)
        assert code == 0, out
        logged = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        results[run] = next(m for m in logged if "eval_loss" in m)
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert results["two"][key] == pytest.approx(results["one"][key], rel=1e-4), (key, results)
