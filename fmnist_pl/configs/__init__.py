"""The packaged config files: the study's settings (`reference_*`) and the fast profile (`fast_*`), one per network."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def packaged_configs() -> dict[str, Path]:
    """Config files shipped in the package, by name (`reference_dense`, `fast_bn_cnn`, ...)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def profile_config(profile: str, network: str) -> Path | None:
    """The packaged config `<profile>_<network>.yaml`, or None when the profile has none for that network."""
    return packaged_configs().get(f"{profile}_{network}")


PROFILES = tuple(sorted({name.split("_", 1)[0] for name in packaged_configs()}))
