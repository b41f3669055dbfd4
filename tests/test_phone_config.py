"""Phone settings (cloud URL and token): file mode 0600, precedence, masking; and the history."""

from __future__ import annotations

import json
from pathlib import Path

from phone.commissioner import DeviceSummary, OnboardingReport, Stage
from phone.config import (
    ConfigStore,
    PhoneConfig,
    default_config_path,
    default_history_path,
    mask_token,
    resolve_config,
)
from phone.history import History
from protocol.errors import Status

TOKEN = "dst_0123456789abcdefghij"


def test_saved_with_mode_0600_and_read_back(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path / "doorstep" / "phone.json")
    store.save(PhoneConfig("https://cloud.example", TOKEN))
    assert (store.path.stat().st_mode & 0o777) == 0o600
    assert (store.path.parent.stat().st_mode & 0o777) == 0o700
    assert json.loads(store.path.read_text()) == {
        "cloud_url": "https://cloud.example",
        "token": TOKEN,
    }
    assert store.load() == PhoneConfig("https://cloud.example", TOKEN)
    assert not list(store.path.parent.glob(".*.tmp"))


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path / "phone.json")
    store.save(PhoneConfig("https://file.example", "file-token"))
    env = {"DOORSTEP_CLOUD_URL": "https://env.example", "DOORSTEP_TOKEN": "env-token"}
    assert resolve_config(store, env={}) == PhoneConfig("https://file.example", "file-token")
    assert resolve_config(store, env=env) == PhoneConfig("https://env.example", "env-token")
    assert resolve_config(store, "https://flag.example", None, env=env) == PhoneConfig(
        "https://flag.example", "env-token"
    )
    assert not resolve_config(ConfigStore(tmp_path / "none.json"), env={}).complete


def test_paths_follow_xdg() -> None:
    assert default_config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/doorstep/phone.json")
    assert default_config_path({"HOME": "/home/u"}) == Path("/home/u/.config/doorstep/phone.json")
    assert default_history_path({"HOME": "/home/u"}) == Path(
        "/home/u/.local/share/doorstep/phone-history.db"
    )


def test_token_never_shown_in_full() -> None:
    assert mask_token(TOKEN) == "••••••••ghij"
    assert mask_token("short") == "••••••••"
    assert mask_token("") == ""
    assert TOKEN not in repr(PhoneConfig("https://c", TOKEN))


async def test_history_records_onboardings(tmp_path: Path) -> None:
    history = History(tmp_path / "data" / "history.db", wall_clock=lambda: 1_700_000_000.0)
    report = OnboardingReport(
        Status.OK,
        Stage.DONE,
        "Onboarded.",
        device=DeviceSummary("Doorstep-0142", "C8:2B:96:1A:01:42", "Doorstep Lamp L1", bytes(16)),
        identifier=bytes.fromhex("3f9a1c7e" + "00" * 12),
        total_s=7.25,
    )
    await history.record(report, name="Doorstep-0142", address="C8:2B:96:1A:01:42")
    failed = OnboardingReport(Status.WINDOW_CLOSED, Stage.VERIFY, "pairing window closed")
    await history.record(failed, name="Doorstep-0242", address="C8:2B:96:1A:02:42")
    await history.close()

    reopened = History(tmp_path / "data" / "history.db")
    entries = await reopened.recent()
    assert [(e.device_name, e.identifier, e.status_name, e.model) for e in entries] == [
        ("Doorstep-0242", "", "window_closed", ""),
        ("Doorstep-0142", "3f9a1c7e", "ok", "Doorstep Lamp L1"),
    ]
    assert entries[1].duration_s == 7.25 and entries[1].at == 1_700_000_000.0
    assert await reopened.known_models() == {"Doorstep-0142": "Doorstep Lamp L1"}
    await reopened.close()
