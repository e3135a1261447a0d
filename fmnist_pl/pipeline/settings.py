"""The pipeline's settings, declared once: the flow's parameter (a form in the Prefect UI), the command-line
options of `flows/full_pipeline.py` (built from the fields here) and the deployment's defaults.

A new option is one field here; the step that uses it passes it on as the `fmnist-pl` option it becomes, where
that step's command is built (tasks.py).
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fmnist_pl.configs import PROFILES, profile_config
from fmnist_pl.errors import ConfigError, check_seed
from fmnist_pl.networks import NETWORKS

NetworkName = Literal[tuple(NETWORKS)]  # type: ignore[valid-type]  # the registry's names, for validation and the UI

ProfileName = Literal[PROFILES]  # type: ignore[valid-type]


class PipelineSettings(BaseModel):
    """What one pipeline run trains and how; None means the profile's config decides."""

    model_config = ConfigDict(extra="forbid")

    models: list[NetworkName] | None = Field(
        None, description="networks to train (default: every network the profile has a config for)"
    )
    profile: ProfileName = Field("fast", description="fast (default) or reference (the study's settings)")
    epochs: int | None = Field(None, ge=1, description="training epochs (default: the profile's)")
    batch_size: int | None = Field(None, ge=1, description="training batch size per device (default: the profile's)")
    val_size: int | None = Field(
        None,
        ge=1,
        description="validation images, the first of the training set (default 5000)",
    )
    accelerator: str = Field("auto", description="cpu, gpu, mps, auto (default)")
    devices: str = Field("auto", description="devices per node: a number, or auto (default)")
    strategy: str = Field("auto", description="Lightning strategy, e.g. ddp (default: auto)")
    num_nodes: int = Field(1, ge=1, description="nodes for multi-node DDP (default 1)")
    train_launcher: str | None = Field(
        None,
        description="command that starts training once per task, e.g. 'srun' in a SLURM allocation for --num-nodes > 1",
    )
    seeds: list[int] = Field(
        [0],
        min_length=1,
        description="train and evaluate every network once per seed, e.g. "
        "0 1 2 (default 0); the report compares networks over all seeds",
    )
    data_dir: str | None = Field(
        None,
        description="folder with the Fashion-MNIST IDX files (default: "
        "$FMNIST_DATA_DIR, a local copy, or the official download)",
    )
    output_dir: str = Field("outputs", description="where runs and cached steps go (default outputs)")
    require_official: bool = Field(
        True,
        description="check the files against the official release (off: your own or test data)",
    )
    export: bool = Field(
        True,
        description="export each network's first-seed model to ONNX with its model card (default; --no-export skips it)",
    )

    dask_address: str | None = Field(
        None,
        description="run every training, evaluation and export on this Dask cluster's workers, e.g. "
        "tcp://HOST:8786 (default: on this machine)",
    )
    dask_workers: int | None = Field(
        None, ge=1, description="run the steps on a Dask LocalCluster of this many worker processes on this machine"
    )

    @model_validator(mode="after")
    def _one_cluster(self) -> PipelineSettings:
        if self.dask_address and self.dask_workers:
            raise ValueError("--dask-address or --dask-workers, not both")
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds_in_range(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"each seed once, got {seeds}")
        for seed in seeds:
            check_seed(seed)
        return seeds

    @field_validator("devices")
    @classmethod
    def _some_devices(cls, devices: str) -> str:
        # Lightning reads "0" as "no devices" and fails deep inside the trainer; say so before anything starts.
        if devices.strip() in ("0", "-0", "[]", ""):
            raise ValueError("needs at least one device: a count (1, 2, ...), a list of ids (0,1) or auto")
        return devices

    def check_hardware(self) -> None:
        """Refuse an accelerator or device count this machine lacks, before anything starts (Lightning would fail
        inside every training step, and a retry cannot help)."""
        import torch

        if self.dask_address:  # the trainings run on the cluster's workers: their GPU resources decide (cluster.py)
            return
        wants_gpu = self.accelerator in ("gpu", "cuda")
        if wants_gpu and not torch.cuda.is_available():
            raise ConfigError("--accelerator gpu: this machine has no usable CUDA GPU; use --accelerator cpu or auto")
        if self.accelerator == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("--accelerator mps: this machine has no Apple GPU; use --accelerator cpu or auto")
        if wants_gpu and self.devices.isdigit() and int(self.devices) > torch.cuda.device_count():
            raise ConfigError(f"--devices {self.devices}: this machine has {torch.cuda.device_count()} GPU(s)")

    def gpus_per_training(self) -> int:
        """The GPUs one training asks a Dask worker for (`--resources GPU=N`): its devices on a CUDA run, else 0."""
        if self.accelerator not in ("gpu", "cuda"):
            return 0
        return int(self.devices) if self.devices.isdigit() else 1

    def config_file(self, network: str) -> Path:
        """The packaged config of `network` in this run's profile."""
        config = profile_config(self.profile, network)
        if config is None:
            raise ConfigError(f"profile {self.profile!r} has no config for network {network!r}; choose other --models")
        return config

    def networks(self) -> list[str]:
        """The networks this run trains: those asked for, else every one the profile has a config for."""
        return list(self.models or [n for n in NETWORKS if profile_config(self.profile, n)])


def options(*pairs: tuple[str, object]) -> list[str]:
    """`--option=value` for each (option, value) pair whose value is not None (a None setting leaves the config's
    value); booleans as jsonargparse reads them."""
    return [f"{o}={str(v).lower() if isinstance(v, bool) else v}" for o, v in pairs if v is not None]


def add_settings_arguments(parser: argparse.ArgumentParser, model: type[BaseModel] = PipelineSettings) -> None:
    """One `--option` per settings field, with its type, choices, default and description."""
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        if isinstance(annotation, types.UnionType):  # `X | None`: the option is X, omitted means None
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        kwargs: dict = {"default": info.default, "help": info.description}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if typing.get_origin(annotation) is list:
                kwargs["nargs"] = "+"
                (annotation,) = typing.get_args(annotation)
            if typing.get_origin(annotation) is Literal:
                kwargs["choices"] = typing.get_args(annotation)
            else:
                kwargs["type"] = annotation
        parser.add_argument(flag, dest=name, **kwargs)
