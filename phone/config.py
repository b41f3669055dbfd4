"""The phone app's settings: which cloud to talk to and the user's bearer token (§6.1).

Stored as JSON in ``$XDG_CONFIG_HOME/doorstep/phone.json`` (default
``~/.config/doorstep/phone.json``), written atomically with mode 0600 in a 0700
directory because the token is a credential. Flags beat the environment
(``DOORSTEP_CLOUD_URL``, ``DOORSTEP_TOKEN``), which beats the file. The token
is never printed or shown in full: ``mask_token`` is what screens display, and
``PhoneConfig``'s ``repr`` hides it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_CLOUD_URL = "DOORSTEP_CLOUD_URL"
ENV_TOKEN = "DOORSTEP_TOKEN"  # noqa: S105 - the variable's name, not a token
CONFIG_NAME = "phone.json"


class ConfigError(Exception):
    """The settings file exists but cannot be read or written."""


@dataclass(frozen=True, repr=False)
class PhoneConfig:
    cloud_url: str = ""
    token: str = ""

    def __repr__(self) -> str:
        return f"PhoneConfig(cloud_url={self.cloud_url!r}, token={mask_token(self.token)!r})"

    @property
    def complete(self) -> bool:
        """Both the cloud URL and the token are known (else the app asks for them first)."""
        return bool(self.cloud_url and self.token)

    def with_overrides(self, cloud_url: str | None, token: str | None) -> PhoneConfig:
        return PhoneConfig(cloud_url or self.cloud_url, token or self.token)


def mask_token(token: str) -> str:
    """What a screen may show of a saved token: never all of it."""
    if not token:
        return ""
    if len(token) < 12:
        return "•" * 8
    return "•" * 8 + token[-4:]


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", str(Path.home()))) / ".config")
    return Path(base) / "doorstep"


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(
        Path(env.get("HOME", str(Path.home()))) / ".local" / "share"
    )
    return Path(base) / "doorstep"


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    return config_dir(env) / CONFIG_NAME


def default_history_path(env: Mapping[str, str] | None = None) -> Path:
    return data_dir(env) / "phone-history.db"


class ConfigStore:
    """Loads and saves ``PhoneConfig`` at one path (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> PhoneConfig:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return PhoneConfig()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise ConfigError(f"{self.path} is not valid JSON") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path} must hold a JSON object")
        url, token = data.get("cloud_url", ""), data.get("token", "")
        if not isinstance(url, str) or not isinstance(token, str):
            raise ConfigError(f"{self.path}: cloud_url and token must be strings")
        return PhoneConfig(url, token)

    def save(self, config: PhoneConfig) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
        body = json.dumps({"cloud_url": config.cloud_url, "token": config.token}, indent=2)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(body + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)  # in case the file pre-existed with a wider mode
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None


def resolve_config(
    store: ConfigStore,
    cloud_url: str | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> PhoneConfig:
    """Flags, then environment, then the saved file."""
    env = os.environ if env is None else env
    saved = store.load()
    from_env = saved.with_overrides(env.get(ENV_CLOUD_URL), env.get(ENV_TOKEN))
    return from_env.with_overrides(cloud_url, token)
