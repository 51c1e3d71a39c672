"""What both backends and every command share, grouped by concern (config, data, plan, run, model,
adapters, after_training)."""

from pathlib import Path

# This checkout: the shipped configs' relative paths (data/sample, models/, adapters/) mean folders here,
# whatever the working directory (common/config/loader.py anchors them).
REPO_ROOT = Path(__file__).resolve().parent.parent
