"""`transferkit push RUN_DIR REPO_ID`: a finished run folder to a Hugging Face Hub model repo.

The folder goes as it is, model card (README.md) included, through `huggingface_hub`
(`HfApi.create_repo` then `upload_folder`), without what only training uses (checkpoints, the
feature cache). Offline, or when the Hub cannot be reached or refuses the token, one `UserError`
says so and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from transferkit.errors import UserError
from transferkit.rundir import LOCAL_ONLY, TRAINING_ONLY, RunDir, render_card

# Leftovers of interrupted atomic writes never leave the machine.
IGNORE_PATTERNS = [f"{name}/*" for name in TRAINING_ONLY] + [*LOCAL_ONLY, "*.tmp", "*.parts/*"]


@dataclass
class PushResult:
    repo_id: str
    url: str  # the commit's page on the Hub


def _prepare_push(run_dir) -> RunDir:
    """Check the folder is a finished run with a model, and give it a card if it has none."""
    folder = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if not folder.path.is_dir():
        raise UserError(f"no such run folder: {folder.path}")
    if not folder.is_complete():
        raise UserError(
            f"{folder.path} is not a finished run (no complete.json): push a run whose "
            "training ended, or resume it first (transferkit train --resume)"
        )
    folder.info()  # a clear error when the model files are missing
    if not folder.card_path.is_file():  # finished before model cards existed
        folder.write_card(render_card(folder, folder.summary()))
    return folder


def push_run(run_dir, repo_id: str, private: bool = False, token: str | None = None) -> PushResult:
    """Upload a finished run folder to the model repo `repo_id` (created if needed)."""
    folder = _prepare_push(run_dir)
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise UserError(
            "HF_HUB_OFFLINE is set: pushing to the Hugging Face Hub needs the network; "
            "unset HF_HUB_OFFLINE on a machine that can reach the Hub"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder.path), repo_id=repo_id, repo_type="model",
            ignore_patterns=IGNORE_PATTERNS, commit_message=f"transferkit push {folder.path.name}",
        )  # fmt: skip
    except LocalTokenNotFoundError:
        raise UserError(_LOGIN) from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise UserError(
                f"the Hub refused the upload to {repo_id} ({status}): {_LOGIN}"
            ) from None
        raise UserError(f"the Hub refused the upload to {repo_id}: {_first_line(err)}") from None
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise UserError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
            f"({type(err).__name__}: {_first_line(err)}); check the network, or HF_ENDPOINT"
        ) from None
    return PushResult(repo_id, str(getattr(commit, "commit_url", commit)))


_LOGIN = "log in with `hf auth login`, or set HF_TOKEN to a token with write access"


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [""])[0][:200]


def _is_network_error(err: Exception) -> bool:
    """OSError (ConnectionError, OfflineModeIsEnabled) or an HTTP client's transport error;
    huggingface_hub's client library has changed (requests, httpx), so go by the class names."""
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, OSError) or bool(names & {"TransportError", "ConnectionError"})
