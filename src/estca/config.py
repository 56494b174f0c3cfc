"""The one typed settings object, read from ``ESTCA_HOME/estca.toml`` and ``ESTCA_*`` variables.

Environment variables win over the file; every setting has a named default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from estca.errors import ConfigurationError

DEFAULT_HOME = "./estca-data"
DEFAULT_LISTEN = "0.0.0.0:8443"  # noqa: S104 - devices reach the server over the network
DEFAULT_REFRESH_SECONDS = 1.0
DEFAULT_PASSPHRASE_CACHE_SECONDS = 300.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_KNOWN_KEYS = {
    "database_url",
    "master_key",
    "listen",
    "hostnames",
    "refresh_seconds",
    "workers",
    "log_level",
}


@dataclass(frozen=True)
class Settings:
    """Everything an estca process is told by its operator."""

    home: Path
    database_url: str
    master_key: str | None = None
    listen: str = DEFAULT_LISTEN
    hostnames: tuple[str, ...] = field(default_factory=tuple)
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS
    workers: int = 0
    log_level: str = "INFO"

    @property
    def master_key_path(self) -> Path:
        return self.home / "master.key"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(environ: Mapping[str, str] | None = None, home: str | None = None) -> Settings:
    """Read the settings.

    Raises:
        ConfigurationError: a value is malformed; the message names the setting.
    """
    env = os.environ if environ is None else environ
    home_path = Path(home or env.get("ESTCA_HOME") or DEFAULT_HOME).absolute()
    values: dict[str, object] = {}
    config_file = home_path / "estca.toml"
    if config_file.exists():
        try:
            values.update(tomllib.loads(config_file.read_text("utf-8")))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{config_file}: {exc}") from None
        unknown = set(values) - _KNOWN_KEYS
        if unknown:
            raise ConfigurationError(f"{config_file}: unknown settings {sorted(unknown)}")
    for key in _KNOWN_KEYS:
        variable = "ESTCA_" + key.upper()
        if env.get(variable):
            values[key] = env[variable]
    database_url = str(values.get("database_url") or f"sqlite:///{home_path / 'estca.db'}")
    if not database_url.startswith(("sqlite", "postgresql")):
        raise ConfigurationError(
            "ESTCA_DATABASE_URL must start with sqlite:// or postgresql+psycopg://"
        )
    raw_hostnames = values.get("hostnames") or ()
    if isinstance(raw_hostnames, str):
        raw_hostnames = [h.strip() for h in raw_hostnames.split(",") if h.strip()]
    if not isinstance(raw_hostnames, list | tuple):
        raise ConfigurationError("hostnames must be a list of names")
    return Settings(
        home=home_path,
        database_url=database_url,
        master_key=str(values["master_key"]) if values.get("master_key") else None,
        listen=str(values.get("listen") or DEFAULT_LISTEN),
        hostnames=tuple(str(h) for h in raw_hostnames),
        refresh_seconds=_number(values, "refresh_seconds", DEFAULT_REFRESH_SECONDS),
        workers=int(_number(values, "workers", 0)),
        log_level=_log_level(values),
    )


def _log_level(values: Mapping[str, object]) -> str:
    # Checked here, not left to logging: logging's own refusal is a traceback that names no
    # setting.
    raw = values.get("log_level") or "INFO"
    level = str(raw).upper()
    if level not in LOG_LEVELS:
        raise ConfigurationError(
            f"ESTCA_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {raw!r}"
        )
    return level


def _number(values: Mapping[str, object], key: str, default: float) -> float:
    raw = values.get(key, default)
    try:
        number = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigurationError(f"ESTCA_{key.upper()} must be a number, not {raw!r}") from None
    if number < 0:
        raise ConfigurationError(f"ESTCA_{key.upper()} must not be negative")
    return number
