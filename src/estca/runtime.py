"""Opening an estca installation: settings, data directory, master key, database, authority."""

from __future__ import annotations

import logging
import os

from estca.authority.service import Authority
from estca.config import Settings
from estca.errors import ConfigurationError
from estca.keys.custody import SoftKeyCustody, load_or_create_master_key
from estca.store.database import Database

logger = logging.getLogger(__name__)


def open_authority(settings: Settings, create: bool = False) -> Authority:
    """Open (or with ``create``, first make) the data directory, master key and database.

    Raises:
        ConfigurationError: not initialised, or the master key is unusable.
    """
    if create:
        _make_data_directory(settings)
    elif not settings.home.is_dir():
        raise ConfigurationError(f"no data directory at {settings.home}; run 'estca init' first")
    master_key = load_or_create_master_key(
        settings.master_key_path, settings.master_key, create=create
    )
    database = Database(settings.database_url)
    database.migrate()
    return Authority(database, SoftKeyCustody(master_key))


def _make_data_directory(settings: Settings) -> None:
    """Create ``ESTCA_HOME`` private to its owner.

    Raises:
        ConfigurationError: it is not a directory, or cannot be created or made private.
    """
    if settings.home.exists() and not settings.home.is_dir():
        raise ConfigurationError(f"ESTCA_HOME {settings.home} exists and is not a directory")
    try:
        settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(settings.home, 0o700)
    except OSError as error:
        raise ConfigurationError(
            f"cannot create the data directory {settings.home}: {error.strerror or error}"
        ) from None
