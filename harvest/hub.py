"""Offline-first access to the Hugging Face hub.

The project's machines have no hub: a hub name would retry for 20+ s before failing. We default both
offline switches on, before `datasets` is first imported (it reads them once, at import), and pass
`local_files_only` to transformers (which honours it whenever it was imported). Set HF_HUB_OFFLINE=0
to allow downloads where a network exists.
"""

import os
from pathlib import Path

from .errors import HarvestError


def hub_offline() -> bool:
    """Default the hub's offline switches on (unless set by the user); return whether they are on."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    return os.environ["HF_HUB_OFFLINE"].upper() in {"1", "ON", "YES", "TRUE"}


def unloadable(kind: str, name: str, path: str, contents: str, offline: bool, fix: str) -> HarvestError:
    """The error for a model or encoder that neither a local folder nor the hub could provide."""
    where = (
        f"the folder {path} holds no loadable {contents}"
        if Path(path).is_dir()
        else "it is not a local folder and the Hugging Face hub is "
        + ("offline (HF_HUB_OFFLINE=1)" if offline else "unreachable or has no such model")
    )
    return HarvestError(f"cannot load {kind} {name!r}: {where}. {fix}")
