"""A sweep's settings, declared once: the sweep flow's parameter (a form in the Prefect UI) and the options of
`python flows/sweep.py` (built from these fields, as the pipeline's are)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fmnist_pl.errors import ConfigError, check_seed
from fmnist_pl.pipeline.settings import NetworkName, PipelineSettings, ProfileName

CONNECT_SECONDS = 10  # a database server that does not answer is refused within this


class SweepSettings(BaseModel):
    """What one sweep tunes and where its study lives; the pipeline's options where they apply."""

    model_config = ConfigDict(extra="forbid")

    network: NetworkName = Field("dense", description="the network whose recipe is tuned (default dense)")
    trials: int = Field(20, ge=1, description="finished (complete or pruned) trials the study ends with (default 20)")
    parallel: int = Field(1, ge=1, description="trials trained at a time (default 1)")
    space: str | None = Field(
        None, description="search-space YAML file (default: the network's, fmnist_pl/configs/search/NETWORK.yaml)"
    )
    study: str | None = Field(None, description="the study's name (default: NETWORK-PROFILE); the same name resumes it")
    storage: str | None = Field(
        None,
        description="Optuna storage URL, e.g. postgresql://USER@HOST/DB to share a study between machines "
        "(default: SQLite in OUTPUT_DIR/sweeps/optuna.db)",
    )
    seed: int = Field(0, description="the trials' training seed and the sampler's (default 0)")
    prune_after: int = Field(
        3, ge=0, description="trials that finish before the median pruner starts pruning (default 3)"
    )
    confirm_seeds: list[int] | None = Field(
        None,
        description="train best.yaml and the default config on these seeds, e.g. 0 1 2, and compare them on the "
        "test set (default: no confirmation)",
    )
    profile: ProfileName = Field("fast", description="the config the trials start from: fast (default) or reference")
    val_size: int | None = Field(
        None, ge=1, description="validation images, the first of the training set (default 5000)"
    )
    accelerator: str = Field("auto", description="cpu, gpu, mps, auto (default)")
    data_dir: str | None = Field(
        None, description="folder with the Fashion-MNIST IDX files (default: as the pipeline finds them)"
    )
    output_dir: str = Field("outputs", description="where sweeps and cached steps go (default outputs)")
    require_official: bool = Field(
        True, description="check the files against the official release (off: your own or test data)"
    )
    dask_address: str | None = Field(None, description="run the trials on this Dask cluster's workers, tcp://HOST:8786")
    dask_workers: int | None = Field(
        None, ge=1, description="run the trials on a Dask LocalCluster of this many worker processes on this machine"
    )

    @model_validator(mode="after")
    def _one_cluster(self) -> SweepSettings:
        if self.dask_address and self.dask_workers:
            raise ValueError("--dask-address or --dask-workers, not both")
        return self

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        check_seed(seed)
        return seed

    @field_validator("confirm_seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        return PipelineSettings._distinct_seeds_in_range(seeds) if seeds else None

    def pipeline(self) -> PipelineSettings:
        """These settings as the pipeline's, for the steps both share (download, fit options, hardware checks)."""
        return PipelineSettings(
            models=[self.network],
            profile=self.profile,
            val_size=self.val_size,
            accelerator=self.accelerator,
            devices="1" if self.accelerator in ("gpu", "cuda") else "auto",  # one trial per device
            seeds=[self.seed],
            data_dir=self.data_dir,
            output_dir=self.output_dir,
            require_official=self.require_official,
            dask_address=self.dask_address,
            dask_workers=self.dask_workers,
        )

    def space_file(self) -> Path:
        from fmnist_pl.sweep.space import packaged_space

        return Path(self.space) if self.space else packaged_space(self.network)

    def study_name(self) -> str:
        return self.study or f"{self.network}-{self.profile}"

    def sweep_dir(self) -> Path:
        """outputs/sweeps/<study>/: trials.csv, figures, best.yaml, the report."""
        return Path(self.output_dir).resolve() / "sweeps" / self.study_name()

    def storage_url(self, hide_password: bool = False) -> str:
        url = self.storage or f"sqlite:///{Path(self.output_dir).resolve() / 'sweeps' / 'optuna.db'}"
        if hide_password:
            from sqlalchemy.engine import make_url

            return make_url(url).render_as_string(hide_password=True)
        return url


def open_storage(url: str) -> object:
    """Optuna's database storage at `url`; ConfigError in one line, within about CONNECT_SECONDS, for a URL that is
    malformed, names a driver that is not installed, or a server that does not answer."""
    import optuna
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as e:
        raise ConfigError(f"--storage {url}: not a database URL ({e})") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database or ".").parent.mkdir(parents=True, exist_ok=True)
        # Parallel trials' fits report to the same file: a writer waits for the lock instead of failing.
        engine = {"connect_args": {"timeout": 60}}
    else:
        engine = {"connect_args": {"connect_timeout": CONNECT_SECONDS}, "pool_pre_ping": True}
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # alembic's and SQLAlchemy's own lines on a failure
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise ConfigError(f"--storage {shown}: cannot open the study's database: {reason}") from None
