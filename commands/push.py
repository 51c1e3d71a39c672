"""`qlora push`: the adapter (or, with --merged, the merged model) and its card to the Hugging Face Hub,
as one commit. Offline, without a token or with a bad one it stops within seconds, before anything is
created or uploaded. The token is read by huggingface_hub (HF_TOKEN or `hf auth login`) and never
written anywhere by this tool."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from common.after_training.lookup import RUN_HELP
from common.console import Say
from common.errors import QLoraError, UsageError

# What a run folder publishes: never checkpoints (pickled optimizer and RNG state) or the metrics log.
ADAPTER_FILES = ["adapter_model.safetensors", "adapters.safetensors", "adapter_config.json", "README.md",
                 "config.yaml", "summary.json", "loss.png", "mlx/adapters.safetensors", "mlx/adapter_config.json"]
REACH_TIMEOUT_S = 10


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload an adapter (or the merged model) and its card to the Hugging Face Hub")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. your-name/mistral-7b-support-lora")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--merged", action="store_true", help="merge first (bf16) and upload the merged model")
    p.add_argument("--base-model", metavar="DIR|ID", help="with --merged: the base (default: the adapter's record)")
    p.set_defaults(handler=run)


def hub_login() -> str:
    """The token, checked against the hub within seconds; a clear error otherwise."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        raise QLoraError("the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set): nothing was uploaded")
    token = get_token()
    if not token:
        raise QLoraError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token); nothing was uploaded")
    try:
        response = get_session().get(f"{constants.ENDPOINT}/api/whoami-v2", timeout=REACH_TIMEOUT_S,
                                     headers={"authorization": f"Bearer {token}"})
    except Exception as exc:  # any transport failure (DNS, refused, timeout) means: not reachable now
        raise QLoraError(f"cannot reach {constants.ENDPOINT} ({type(exc).__name__}); nothing was uploaded") from None
    if response.status_code == 401:
        raise QLoraError("the Hugging Face token was refused (401): log in again with `hf auth login`; nothing was uploaded")
    if response.status_code >= 400:
        raise QLoraError(f"{constants.ENDPOINT} answered {response.status_code}; nothing was uploaded")
    return token


def run(args, say: Say) -> int:
    from common.after_training.lookup import find_adapter

    if args.repo_id.count("/") != 1:
        raise UsageError(f"{args.repo_id}: REPO_ID is owner/name")
    ref = find_adapter(args.run)
    token = hub_login()
    if not args.merged:
        folder = ref.run_root or ref.folder
        upload(folder, args.repo_id, args.private, token, allow=[f for f in ADAPTER_FILES if (folder / f).exists()])
    else:
        from commands.merge import merge_run

        with merge_folder((ref.run_root or ref.folder).resolve().parent) as tmp:
            merged = merge_run(args.run, tmp / "merged", "bf16", "transformers", args.base_model, say)
            upload(merged, args.repo_id, args.private, token, allow=None)
    say.ok(f"uploaded to https://huggingface.co/{args.repo_id} ({'private' if args.private else 'public'})")
    return 0


@contextlib.contextmanager
def merge_folder(beside: Path):
    """A temporary folder for the merged model next to the run (on its disk, which the merge's free-space check
    reads), removed afterwards; a folder that cannot be written is said as such before anything is merged."""
    from common.after_training.staging import cannot_write

    try:
        made = tempfile.TemporaryDirectory(prefix=".qlora-push-", dir=beside)
    except OSError as exc:
        raise cannot_write(beside, exc, "make the folder writable, or copy the run to a writable folder and push "
                           "that copy", why="push --merged writes the merged model beside the run first; ") from None
    with made as tmp:
        yield Path(tmp)


def upload(folder: Path, repo_id: str, private: bool, token: str, allow: list[str] | None) -> None:
    """One commit: the hub applies all files or none."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=allow,
                          commit_message=f"mistral-qlora: {folder.name}")
    except Exception as exc:  # the hub's HTTP errors carry the server's explanation
        raise QLoraError(f"upload to {repo_id} failed: {exc}") from None
