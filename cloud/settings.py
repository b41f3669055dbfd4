"""Cloud settings: limits and windows of §6, with sane defaults.

Everything the service decides with a number lives here so tests and
benchmarks can change it without touching the service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cloud.errors import ConfigurationError

ENV_DB = "DOORSTEP_CLOUD_DB"


class EntropySourceLike(Protocol):
    """What the cloud needs from :class:`protocol.entropy.EntropySource`."""

    def read(self, n: int) -> bytes: ...


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "doorstep"


#: ``doorstep cloud serve --log-level`` (and ``DOORSTEP_CLOUD_LOG_LEVEL`` for its workers)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def default_database_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    url = env.get(ENV_DB)
    if url:
        return url
    return "sqlite:///" + str(default_data_dir(env) / "cloud.db")


@dataclass(frozen=True)
class Settings:
    """Tunable numbers of the cloud. Defaults follow PROTOCOL.md §5–§6."""

    database_url: str = "sqlite:///:memory:"
    #: §6.1 ``expires_in``: the ticket's validity and the identical-retry window.
    attempt_validity_s: int = 120
    #: §6.1: (dev_id, N_D) is remembered for at least expires_in + this. The record is
    #: the attempt row itself, kept at least completion_window_s + 1 day (and for good
    #: once bound); Settings refuses numbers that would forget it sooner.
    replay_margin_s: int = 300
    #: §6.4: bind/complete and check-in are accepted this long after bind/start.
    completion_window_s: int = 7 * 86400
    #: §6.3 clock skew.
    max_skew_s: int = 300
    max_body_bytes: int = 16 * 1024
    #: Fixed-window rate limits at bind/start, counted in the database.
    rate_window_s: int = 60
    rate_per_user: int = 120
    rate_per_device: int = 30
    rate_per_address: int = 600
    #: How often the maintenance task prunes expired rows.
    maintenance_interval_s: float = 10.0
    #: How often it checkpoints SQLite's WAL (if anything was written): under full
    #: load the WAL grows ~100 MB a second, and requests slow down as it grows;
    #: each checkpoint ends with a pause of the writer (~1.4 ms, at most ~4 ms
    #: in ``bench/cloud_load.py``; docs/OPERATIONS.md says why). Every 0.1 s
    #: rather than 0.25 s, each copies less at once, and p99 at half the peak
    #: rate in ``bench/cloud_load.py`` stayed ≤ 8.1 ms in 7 runs, against 7.6–32 ms
    #: (over 10 ms in 4 of 7) at 0.25 s.
    checkpoint_interval_s: float = 0.1
    auto_migrate: bool = True
    #: Ticket validity written into the ticket (seconds).
    ticket_validity_s: int = 120
    #: How long a bearer token found in the database is trusted without asking it
    #: again (0: ask every time). Tokens are only ever added today; a future
    #: revocation takes effect within this time on every instance.
    token_cache_s: float = 5.0

    @property
    def attempt_retention_s(self) -> int:
        """How long an unbound attempt (and so its (dev_id, N_D) record) is kept."""
        return self.completion_window_s + 86400

    def __post_init__(self) -> None:
        limits = (self.rate_per_user, self.rate_per_device, self.rate_per_address)
        if min(self.rate_window_s, *limits) < 1:
            raise ConfigurationError(
                "rate_window_s and the rate limits must be at least 1", code="bad_settings"
            )
        if not (self.maintenance_interval_s > 0 and self.checkpoint_interval_s > 0):
            raise ConfigurationError(
                "maintenance_interval_s and checkpoint_interval_s must be above 0",
                code="bad_settings",
            )
        if self.attempt_retention_s < self.attempt_validity_s + max(300, self.replay_margin_s):
            raise ConfigurationError(
                "completion_window_s + 1 day must cover attempt_validity_s + replay_margin_s "
                "(§6.1: each (dev_id, N_D) is remembered that long)",
                code="bad_settings",
            )

    def with_rate_limits(self, per_user: int, per_device: int, per_address: int) -> Settings:
        from dataclasses import replace

        return replace(
            self, rate_per_user=per_user, rate_per_device=per_device, rate_per_address=per_address
        )
