"""The Accelerate config files shipped in examples/accelerate/ parse with Accelerate's own loader
and launcher code, say what docs/distributed.md says they do, and (fsdp.yaml) set up an FSDP
that transferkit accepts, with a wrap class that exists in the backbone it names."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
CONFIGS = ("multi_gpu.yaml", "multi_node.yaml", "fsdp.yaml")


def launch_args(config: Path, machine_rank: int | None = None) -> argparse.Namespace:
    """The arguments `accelerate launch --config_file CONFIG -m transferkit.cli train R` ends
    with, once the config file is merged in (Accelerate's launcher code, nothing launched)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(config)]
    if machine_rank is not None:
        argv += ["--machine_rank", str(machine_rank)]
    args = launch_command_parser().parse_args([*argv, "-m", "transferkit.cli", "train", "r.yaml"])
    args, _, _ = _validate_launch_command(args)
    return args


def launch_env(config: Path) -> dict[str, str]:
    """The FSDP environment variables that `accelerate launch` gives each process."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = prepare_multi_gpu_env(launch_args(config))
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def test_every_example_config_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_example_config_parses(name):
    config = load_config_from_file(str(EXAMPLES / name))
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment.value == "LOCAL_MACHINE" and not config.use_cpu
    # The recipe's train.mixed_precision decides; the configs must not pretend otherwise.
    assert config.mixed_precision == "no"
    expected = DistributedType.FSDP if name == "fsdp.yaml" else DistributedType.MULTI_GPU
    assert config.distributed_type == expected
    assert config.num_processes > 1


def test_multi_node_config_gives_each_machine_its_rank_and_the_main_address():
    config = load_config_from_file(str(EXAMPLES / "multi_node.yaml"))
    assert config.num_machines == 2 and config.num_processes % config.num_machines == 0
    from accelerate.utils.launch import prepare_multi_gpu_env

    # Machine 1: the launcher does not probe the (placeholder) main address's port.
    args = launch_args(EXAMPLES / "multi_node.yaml", machine_rank=1)
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.node_rank) == ("2", 1)
    assert args.nproc_per_node == str(config.num_processes // 2)
    # Accelerate 1.15 does not carry `same_network` over from the file: the main machine's
    # address then reaches torchrun as its rendezvous endpoint instead of master_addr.
    main = f"{config.main_process_ip}:{config.main_process_port}"
    assert main in (
        getattr(args, "rdzv_endpoint", None),
        f"{getattr(args, 'master_addr', None)}:{getattr(args, 'master_port', None)}",
    )


def test_fsdp_config_sets_up_an_fsdp_that_transferkit_trains(monkeypatch):
    from transferkit.engine.accelerator import check_fsdp
    from transferkit.models import create_backbone

    env = launch_env(EXAMPLES / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # read from those variables, as Accelerate does
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP, num_processes=4, device=torch.device("cuda"),
        state=SimpleNamespace(fsdp_plugin=plugin),
    )  # fmt: skip
    check_fsdp(accelerator, None)  # no UserError
    # The wrap class names a module of the ViTs the docs use it with.
    backbone = create_backbone("timm:test_vit")
    wrap = env["FSDP_TRANSFORMER_CLS_TO_WRAP"]
    assert any(type(m).__name__ == wrap for m in backbone.model.modules())
