"""Data-parallel training on several GPUs of one machine (`qlora train --gpus N`).

The engine is the one everyone uses: torchrun starts N copies of the same `qlora train`, and
transformers' Trainer (through accelerate) wraps each copy's 4-bit model in DDP. This module holds
only what is ours around it: who this process is (its rank), how the config's global batch is split
over the ranks, and the launcher that re-runs the command under torchrun and reports a failed rank
once. It never imports torch at module level.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError
from common.run.ranks import is_main, launched, local_rank, rank, world_size

__all__ = ["is_main", "launched", "local_rank", "rank", "world_size"]  # callers say distributed.rank()

RANK_DIR = "QLORA_RANK_DIR"  # where each rank's log and error go (made by the launcher)
STARTED = "QLORA_STARTED"  # the launcher's time.monotonic() at start: a --time-budget counts from there
# Time the ranks get to finish their step and save after a stop signal before torchrun kills them.
# torchrun's default, 30 s, can cut off an evaluation in flight plus a save on a 7B; longer would
# keep the survivors of a crashed rank waiting (NCCL does not notice a dead peer by itself)
SHUTDOWN_SECONDS = 120


@dataclass(frozen=True)
class BatchSplit:
    micro: int  # examples (or packed rows) per micro-batch on each rank
    accumulation: int  # micro-batches each rank accumulates per optimizer step
    ranks: int

    def line(self, micro: int, accumulation: int) -> str:
        changed = [what for what, before, after in (("micro-batch", micro, self.micro),
                                                    ("gradient accumulation", accumulation, self.accumulation))
                   if before != after]
        return (f"batch: {micro} x {accumulation} per optimizer step split over {self.ranks} processes by "
                f"{' and '.join(changed)}: {self.micro} x {self.accumulation} on each, "
                f"{self.micro * self.accumulation * self.ranks} rows a step as on one GPU")


def split_batch(micro: int, accumulation: int, ranks: int) -> BatchSplit:
    """The same rows per optimizer step on `ranks` processes as `micro x accumulation` on one. Each
    rank keeps the largest micro-batch that divides its share (the one the memory plan was made for
    when accumulation alone can be divided) and accumulates the rest: 2 x 2 on 2 GPUs runs 2 x 1 on
    each, on 4 GPUs 1 x 1."""
    total = micro * accumulation
    if total % ranks:
        raise UsageError(
            f"--gpus {ranks}: the global batch (training.batch_size {micro} x training.gradient_accumulation_steps "
            f"{accumulation} = {total} rows a step) cannot be split evenly over {ranks} GPUs. Make the product a "
            f"multiple of {ranks} (e.g. --set training.gradient_accumulation_steps="
            f"{ranks // math.gcd(ranks, micro) * -(-accumulation // (ranks // math.gcd(ranks, micro)))}), "
            "or use a GPU count that divides it."
        )
    share = total // ranks
    rank_micro = max(m for m in range(1, min(micro, share) + 1) if share % m == 0)
    return BatchSplit(rank_micro, share // rank_micro, ranks)


def requested_ranks(value: str | None, on_cpu: bool, count_gpus=None) -> int:
    """--gpus N | all as a process count. `cuda.device: cpu` runs N CPU processes over gloo (how
    the tests exercise the real multi-process path without GPUs)."""
    if value is None:
        return 1
    if value == "all":
        if on_cpu:
            raise UsageError("--gpus all counts GPUs, but this config trains on the CPU (cuda.device: cpu); "
                             "give a number of processes, e.g. --gpus 2")
        from common.plan.machine import gpu_count

        found = (count_gpus or gpu_count)()
        if not found:
            raise UsageError("--gpus all: nvidia-smi lists no GPU on this machine")
        return found
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--gpus {value!r}: give a number of GPUs (1 or more) or 'all'")
    wanted = int(value)
    if not on_cpu and wanted > 1:
        from common.plan.machine import gpu_count

        found = (count_gpus or gpu_count)()
        if wanted > found:
            raise UsageError(f"--gpus {wanted}: nvidia-smi lists {found} GPU(s) on this machine; "
                             + (f"use --gpus {found} or fewer" if found else "drop --gpus (or train with --platform cpu)"))
    return wanted


def without_gpus(argv: Sequence[str]) -> list[str]:
    """The command line a rank runs: the same, minus --gpus (a rank must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def torchrun_command(ranks: int, argv: Sequence[str]) -> list[str]:
    grace = [f"--shutdown_timeout={SHUTDOWN_SECONDS}"] if torchrun_accepts(f"--shutdown_timeout={SHUTDOWN_SECONDS}") else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            *grace, "-m", "commands", *without_gpus(argv)]


def torchrun_accepts(option: str) -> bool:
    """Does this torch's torchrun know `option`? (--shutdown_timeout is newer than torch 2.11, whose
    torchrun refuses it and starts nothing: measured on the H100 pair, 2026-11-27.)"""
    from torch.distributed.run import get_args_parser

    _, unknown = get_args_parser().parse_known_args([option, "script.py"])
    return not unknown


def started(own: float) -> float:
    """When the command started: the launcher's clock in a rank (CLOCK_MONOTONIC is system-wide)."""
    return float(os.environ.get(STARTED, own))


def launch(ranks: int, argv: Sequence[str], say, started_at: float) -> int:
    """Run this `qlora train` on `ranks` processes through torchrun and wait.

    torchrun starts in a session of its own (as its ranks do), so a Ctrl-C in the terminal reaches
    only this process, which forwards it once; in our process group torchrun would get it from the
    terminal too, and pass on two signals, which the ranks read as "abort now". Rank 0 prints; the
    others keep their output in a log each, and the first rank that failed has its error printed
    here, once."""
    folder = Path(tempfile.mkdtemp(prefix="qlora-ranks-"))
    env = {**os.environ, RANK_DIR: str(folder), STARTED: repr(started_at), "PYTHONUNBUFFERED": "1"}
    say.info(f"launching {ranks} processes with torchrun; rank 0 reports")
    # torchrun's own report of a failure is a traceback: kept in a file, our message is printed instead
    with open(folder / "torchrun.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(torchrun_command(ranks, argv), env=env, start_new_session=True, stderr=log)
    forwarded = []

    def forward(signum, frame):
        """The first signal goes to torchrun (which passes it to every rank: stop after this step and
        save). A second would make torchrun exit and leave its ranks running, so it goes to the ranks
        themselves, which read it as "abort now"."""
        if not forwarded:
            proc.send_signal(signum)
        else:
            for pid in rank_pids(folder):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
        forwarded.append(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0 or finished(folder, ranks):  # torchrun exits 1 after a forwarded signal, however its ranks ended
        shutil.rmtree(folder, ignore_errors=True)
        return 0
    if not rank_pids(folder):  # no process ever started: torchrun itself failed (its arguments, its rendezvous)
        said = (folder / "torchrun.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        say.error(f"torchrun could not start the {ranks} processes: {said[-1] if said else f'exit code {code}'}")
        say.info(f"torchrun's log: {folder / 'torchrun.log'}")
        return code
    silent = [r for r in range(ranks) if not any((folder / f"rank-{r}.{end}").is_file() for end in ("done", "error", "failed"))]
    failed = first_failure(folder, silent)
    if failed:
        say.error(failed)
    if silent and (failed is None or reported_root(folder) is None):
        say.error(f"process(es) {', '.join(map(str, silent))} ended without a report: killed (the out-of-memory killer, a "
                  "signal) or crashed; the others were stopped. Continue with --resume auto.")
    elif silent:
        say.info(f"process(es) {', '.join(map(str, silent))} were stopped after that. Continue with --resume auto once "
                 "the cause is fixed.")
    say.info(f"logs of every process (and torchrun's own): {folder}")
    return code


def first_failure(folder: Path, silent: Sequence[int] = ()) -> str | None:
    """The error to print once: rank 0's own (a QLoraError: every rank usually hits the same), else
    that of the process that failed first: the one torchrun saw fail first, or else the earliest
    report. None when the first was a process that left no report (`silent`: killed, or crashed
    without a word).

    A rank prints its errors on its stderr, which goes to torchrun's log, not to the terminal: a crash
    in rank 0 is printed here like any other rank's."""
    own = folder / "rank-0.error"
    if own.is_file():
        return own.read_text(encoding="utf-8").strip()
    if root_cause(folder) in silent:
        return None
    root = reported_root(folder)
    reports = sorted([*folder.glob("rank-*.error"), *folder.glob("rank-*.failed")], key=lambda p: p.stat().st_mtime_ns)
    chosen = root or (reports[0] if reports else None)
    if chosen is None:
        return None
    # without torchrun's word, a process that left no report may have gone first
    first = " first, which stopped the others" if root or not silent else ""
    return f"process {chosen.stem.removeprefix('rank-')} failed{first}: {chosen.read_text(encoding='utf-8').strip()}"


def reported_root(folder: Path) -> Path | None:
    """The report (rank-N.error or .failed) of the process torchrun saw fail first, if it left one."""
    root = root_cause(folder)
    if root is None:
        return None
    return next((p for p in (folder / f"rank-{root}.error", folder / f"rank-{root}.failed") if p.is_file()), None)


def root_cause(folder: Path) -> int | None:
    """The rank torchrun names under "Root Cause (first observed failure)" in its log, when it failed
    strictly before every other failure listed there. torchrun stamps failures in whole seconds and
    names the lowest rank on a tie, which says nothing about which went first."""
    log = folder / "torchrun.log"
    if not log.is_file():
        return None
    text = log.read_text(encoding="utf-8", errors="replace")
    if "Root Cause (first observed failure):" not in text:
        return None
    failures, root_part = text.split("Root Cause (first observed failure):", 1)
    entry = re.compile(r"time\s*:\s*(\S+)(?:(?!time\s*:).)*?\brank\s*:\s*(\d+)", re.DOTALL)
    root = entry.search(root_part)
    if root is None:
        return None
    when, rank = root.group(1), int(root.group(2))
    others = [w for w, r in entry.findall(failures) if int(r) != rank]
    return rank if all(w > when for w in others) else None


_stop_group = None  # the gloo group of any_rank, made by start() on every rank


def start(on_cpu: bool) -> None:
    """Join the process group now (accelerate reuses it), so that the command can order its own
    file work (main_first) before the Trainer exists; and a gloo group beside it for the stop
    decision (any_rank), made here while every rank is at the same point."""
    global _stop_group
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("gloo" if on_cpu else "nccl")
    if _stop_group is None:
        _stop_group = dist.new_group(backend="gloo")


def stop() -> None:
    """Leave the process groups (the stop group with the default one) before the process exits. Left
    to the interpreter's exit, gloo's threads can outlive it and abort the process ("terminate called
    without an active exception") after a rank that finished its work."""
    global _stop_group
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()  # every group, the stop group too
        except Exception:  # noqa: BLE001  (the rank's work is done and recorded: a teardown error must not undo it)
            pass
    _stop_group = None


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, then the others (what it wrote, they read)."""
    if world_size() == 1:
        yield
        return
    import torch.distributed as dist

    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def rank_log() -> Path:
    return Path(os.environ.get(RANK_DIR) or tempfile.gettempdir(), f"rank-{rank()}.log")


def record_pid() -> None:
    folder = os.environ.get(RANK_DIR)
    if folder:
        Path(folder, f"rank-{rank()}.pid").write_text(str(os.getpid()), encoding="utf-8")


def rank_pids(folder: Path) -> list[int]:
    return [int(p.read_text(encoding="utf-8")) for p in folder.glob("rank-*.pid")]


def record_success() -> None:
    folder = os.environ.get(RANK_DIR)
    if folder:
        Path(folder, f"rank-{rank()}.done").touch()


def finished(folder: Path, ranks: int) -> bool:
    return all((folder / f"rank-{r}.done").is_file() for r in range(ranks))


def record_failure(message: str, ours: bool) -> None:
    """A rank's failure, for the launcher to report once: `ours` a QLoraError, else anything else (a
    crash, a lost peer, a signal)."""
    folder = os.environ.get(RANK_DIR)
    if folder:
        Path(folder, f"rank-{rank()}.{'error' if ours else 'failed'}").write_text(message + "\n", encoding="utf-8")


def quiet_rank() -> None:
    """Ranks other than 0 print nothing on the terminal: their output goes to their log."""
    log = open(rank_log(), "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (open for the process's life)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on one (one stop decision for all), asked after every step.

    The flag goes through a gloo group on a CPU tensor: an NCCL all-reduce of a GPU tensor read
    with `.item()` would make the CPU wait for every kernel of the step queued so far, once a step,
    and grow with the GPU count. Over gloo the ranks' CPUs meet (a local round trip) and the GPUs
    keep running; every rank still gets the same answer after the same step."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_stop_group)
    return bool(value.item())


def planned_ranks(gpus: str | None, cfg) -> int:
    """Processes to launch: 1 when --gpus is absent, or inside a torchrun rank already. The batch
    split is checked here, before anything starts."""
    if gpus is None or launched():
        return 1
    if cfg.backend == "mlx":
        raise UsageError("--gpus is for the CUDA backend (torchrun + DDP); MLX trains on one Apple GPU. "
                         "Drop --gpus, or train on an NVIDIA machine.")
    ranks = requested_ranks(gpus, on_cpu=cfg.cuda.device == "cpu")
    split_batch(cfg.training.batch_size, cfg.training.gradient_accumulation_steps, ranks)
    return ranks


@contextmanager
def one_gpu(cfg, say) -> Iterator[None]:
    """A one-process run on a machine with several GPUs trains on the first one. Left to see them all,
    transformers' Trainer would wrap the model in nn.DataParallel, which TRL refuses ("does not support
    nn.DataParallel": seen on two H100s, 2026-11-27); DDP is --gpus N. A CUDA_VISIBLE_DEVICES the user
    set is left alone; ours is set before CUDA starts and removed when the run ends."""
    from common.plan.machine import gpu_count

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cfg.backend != "cuda" or cfg.cuda.device == "cpu" or visible is not None or gpu_count() < 2:
        yield
        return
    say.info(f"{gpu_count()} GPUs here: training on GPU 0 (--gpus N trains data-parallel on N)")
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    try:
        yield
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)


def as_rank(body, on_cpu: bool) -> int:
    """Run `body()` as one torchrun process. Rank 0 holds the lock, writes the run folder and prints;
    the others keep their output in their log. Any error is recorded for the launcher, which reports
    the one that came first (the others usually follow from it)."""
    import traceback

    from common.errors import QLoraError

    def stopped(signum, frame):  # outside training (which saves first): also what torchrun sends when another process failed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)
    record_pid()  # a second Ctrl-C reaches the ranks directly (launch)
    start(on_cpu=on_cpu)
    if not is_main():
        quiet_rank()
    try:
        code = body()
        record_success()
        stop()
        return code
    except QLoraError as exc:
        record_failure(str(exc), ours=True)
        raise
    except KeyboardInterrupt:
        record_failure("stopped by a signal", ours=False)
        raise
    except Exception as exc:  # a traceback stays in this process's log; the user gets one line
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        record_failure(message, ours=False)
        traceback.print_exc()
        raise QLoraError(f"{message} (process {rank()}; full traceback in its log)") from None

