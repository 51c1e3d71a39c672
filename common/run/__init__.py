"""During a run: the run folder, checkpoints, summary, stopping, time budget, progress, tracking, ranks."""
