"""What resolves without the network: which pretrained weights load from a package or a local
cache (`model.weights` left unset takes them when they do), and whether a download host answers
at all, asked once a minute so that `weights: pretrained` with no network fails in seconds
instead of retrying the hub for most of a minute."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

AUTO_WEIGHTS = "auto"  # model.weights left unset: pretrained where they load offline
HF_HOST = "huggingface.co"
_ASKED: dict[str, tuple[float, bool]] = {}  # host -> (when, answered)
REMEMBER_S = 60.0
TIMEOUT_S = 3.0


def reachable(host: str) -> bool:
    """Whether `host` accepts a connection on port 443 within a few seconds (remembered for a
    minute). With HF_HUB_OFFLINE=1 the Hugging Face hub is taken as unreachable."""
    if host == HF_HOST and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    now = time.monotonic()
    asked = _ASKED.get(host)
    if asked is not None and now - asked[0] < REMEMBER_S:
        return asked[1]
    answered: list[bool] = []

    def connect() -> None:  # name lookup has no timeout of its own: a thread bounds it
        try:
            socket.create_connection((host, 443), timeout=TIMEOUT_S).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S + 0.5)
    _ASKED[host] = (now, bool(answered and answered[0]))
    return _ASKED[host][1]


def hub_has_cached(pretrained_cfg: dict) -> bool:
    """Whether the Hugging Face cache already holds the file timm would load for this config."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return False
    repo, _, revision = hub_id.partition("@")
    # timm reads `hf_hub_filename` when set, else model.safetensors before pytorch_model.bin.
    filename = pretrained_cfg.get("hf_hub_filename")
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    return any(
        isinstance(try_to_load_from_cache(repo, n, revision=revision or None), str) for n in names
    )


def torch_hub_file(url: str) -> Path:
    """Where torch.hub keeps the file it downloads from `url`."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def download_host(pretrained_cfg: dict) -> str:
    """The host timm downloads this config's weights from."""
    if pretrained_cfg.get("hf_hub_id"):
        return HF_HOST
    return urlparse(pretrained_cfg.get("url") or "").hostname or HF_HOST


def resolve_auto_weights(spec: str, weights: str | None) -> tuple[str | None, str | None]:
    """`weights`, with `auto` resolved: "pretrained" where they load offline, else None
    (random); and, for `auto`, a line for the log that says which and why."""
    if weights != AUTO_WEIGHTS:
        return weights, None
    found, where = pretrained_offline(spec)
    if found:
        return "pretrained", f"backbone weights: pretrained, from {where} (model.weights unset)"
    return None, (f"backbone weights: random initialization, since {where} (model.weights "
                  "unset; set it to pretrained to download them, or to a weights file)")  # fmt: skip


def pretrained_offline(spec: str) -> tuple[bool, str]:
    """Whether `weights: pretrained` for `spec` (SOURCE:NAME) loads without the network, and
    where from (or why not), in words for the log."""
    source, _, name = spec.partition(":")
    if source == "timm":
        import timm

        from transferkit.models.packaged import packaged_weights

        packaged = packaged_weights(name)
        if packaged is not None and packaged.file() is not None:
            return True, f"the ImageNet checkpoint of the installed package {packaged.package}"
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            return False, f"timm has no pretrained weights for {name}"
        if hub_has_cached(cfg.to_dict()):
            return True, "timm's pretrained weights in the Hugging Face cache"
        return False, (f"timm's pretrained weights for {name} are not in the Hugging Face cache "
                       "and no installed package ships them")  # fmt: skip
    from torchvision import models

    arch, _, tag = name.partition(".")
    try:
        enum = models.get_model_weights(arch)
    except ValueError:
        return False, f"torchvision has no pretrained weights for {arch}"
    url = (enum[tag] if tag else enum.DEFAULT).url
    if torch_hub_file(url).is_file():
        return True, "torchvision's pretrained weights in the torch hub cache"
    return False, f"torchvision's pretrained weights for {name} are not in the torch hub cache"
