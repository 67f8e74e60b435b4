"""Logger factories: wandb offline unless the user is logged in or asks for online."""
from __future__ import annotations

import netrc
import os


def wandb_online() -> bool:
    """Online if WANDB_MODE says so, else if an API key is present (env or ~/.netrc from `wandb login`)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("online", "run")
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(project: str, save_dir: str, name: str | None = None, **kwargs):
    from pytorch_lightning.loggers import WandbLogger

    os.makedirs(save_dir, exist_ok=True)
    # an explicit WANDB_MODE (e.g. "disabled") is still honoured by wandb itself
    return WandbLogger(project=project, save_dir=save_dir, name=name, offline=not wandb_online(), **kwargs)
