"""Unit tests of the pure parts of bluezsim: AD sizing, ATT rules, timing grid."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bluezsim import att
from bluezsim.addata import AdvertisementContent, AdvertisementTooLong, uuid_size
from bluezsim.timing import next_event

DS1 = "a86b0001-afb3-421f-8c9f-85123f56ad4a"


def test_ds1_advertisement_is_28_bytes_and_name_goes_to_scan_response() -> None:
    content = AdvertisementContent(
        service_uuids=(DS1,), manufacturer_data={0xFFFF: b"\x01\x02\x03"},
        local_name="Doorstep-1A2B",
    )
    assert content.adv_data_length() == 28
    assert content.scan_response_length() == 15
    content.check()


def test_advertisement_over_31_bytes_is_rejected() -> None:
    content = AdvertisementContent(
        service_uuids=(DS1,), manufacturer_data={0xFFFF: b"\x00" * 7}
    )
    with pytest.raises(AdvertisementTooLong) as info:
        content.check()
    assert info.value.length == 32


def test_uuid_sizes() -> None:
    assert uuid_size("180d") == 2
    assert uuid_size("0000180d-0000-1000-8000-00805f9b34fb") == 2
    assert uuid_size("1234180d-0000-1000-8000-00805f9b34fb") == 4
    assert uuid_size(DS1) == 16


@pytest.mark.parametrize(
    ("code", "name", "text"),
    [
        (0x02, "org.bluez.Error.NotPermitted", "Read not permitted"),
        (0x03, "org.bluez.Error.NotPermitted", "Write not permitted"),
        (0x0D, "org.bluez.Error.InvalidArguments", "Invalid Length"),
        (0x0E, "org.bluez.Error.Failed", "Operation failed with ATT error: 0x0e"),
        (0x80, "org.bluez.Error.Failed", "Operation failed with ATT error: 0x80"),
    ],
)
def test_att_error_mapping(code: int, name: str, text: str) -> None:
    error = att.att_error_to_dbus(code)
    assert (error.name, error.text) == (name, text)


@given(st.integers(min_value=23, max_value=517), st.integers(min_value=1, max_value=512))
def test_long_write_prepare_count_covers_value(mtu: int, length: int) -> None:
    count = att.prepare_write_count(length, mtu)
    assert count * (mtu - 5) >= length > (count - 1) * (mtu - 5)


def test_mtu_bounds() -> None:
    assert att.check_mtu(23) == 23
    with pytest.raises(ValueError):
        att.check_mtu(22)
    with pytest.raises(ValueError):
        att.check_mtu(518)


@given(st.floats(0, 10), st.floats(0.001, 1), st.floats(0, 20))
def test_next_event_is_on_the_grid_and_not_before(anchor: float, interval: float, after: float) -> None:
    at = next_event(anchor, interval, after)
    assert at >= after - 1e-9
    assert at >= anchor + interval - 1e-9
    k = (at - anchor) / interval
    assert abs(k - round(k)) < 1e-6
