"""Tests for protocol.entropy: SP 800-90B §4.4 health tests and the fail-closed source."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import entropy
from protocol.entropy import (
    APT_WINDOW_BINARY,
    APT_WINDOW_NON_BINARY,
    STARTUP_SAMPLES,
    DeviceSource,
    EntropySource,
    HealthTest,
    HealthTestFailure,
    HealthTests,
    SampleKind,
    adaptive_proportion_cutoff,
    adaptive_proportion_window,
    default_entropy,
    entropy_from_system,
    repetition_count_cutoff,
)
from protocol.errors import EntropyError

LOGGER = "doorstep.entropy"

# --- test sources (real objects behind the RawSource protocol, no mocks) -----------------


class KeystreamSource:
    """A deterministic, statistically good stream: SHAKE-256 of a seed and a counter."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self.calls: list[int] = []

    def read(self, n: int, /) -> bytes:
        self.calls.append(n)
        self._counter += 1
        return hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big")).digest(n)


class StuckSource:
    """A hardware RNG stuck on one byte value."""

    def __init__(self, value: int = 0xA5) -> None:
        self.value = value
        self.calls: list[int] = []

    def read(self, n: int, /) -> bytes:
        self.calls.append(n)
        return bytes([self.value]) * n


class TurnsStuckSource:
    """Healthy for its first ``good_bytes`` bytes, stuck afterwards."""

    def __init__(self, good_bytes: int, value: int = 0x5A) -> None:
        self._good = KeystreamSource(b"turns-stuck")
        self._left = good_bytes
        self.value = value
        self.calls: list[int] = []

    def read(self, n: int, /) -> bytes:
        self.calls.append(n)
        good = min(n, self._left)
        self._left -= good
        return self._good.read(good) + bytes([self.value]) * (n - good)


class BrokenSource:
    """Raises like a device that went away."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def read(self, n: int, /) -> bytes:
        self.calls.append(n)
        raise OSError(19, "No such device")


class ShortSource:
    """Returns fewer bytes than asked."""

    def __init__(self, short_by: int = 1) -> None:
        self._short_by = short_by
        self.calls: list[int] = []

    def read(self, n: int, /) -> bytes:
        self.calls.append(n)
        return os.urandom(max(0, n - self._short_by))


# --- a literal transcription of the SP 800-90B §4.4 pseudo-code, as the reference ---------


def reference_first_failure(
    samples: list[int], rct_cutoff: int, apt_cutoff: int, window: int
) -> tuple[HealthTest, int] | None:
    # §4.4.1 and §4.4.2 run side by side; RCT is reported first on a tie.
    failures: list[tuple[int, int, HealthTest]] = []
    a, b = samples[0] if samples else None, 1
    if samples and b >= rct_cutoff:
        failures.append((1, 0, HealthTest.REPETITION_COUNT))
    for i in range(1, len(samples)):
        if samples[i] == a:
            b += 1
            if b >= rct_cutoff:
                failures.append((i + 1, 0, HealthTest.REPETITION_COUNT))
                break
        else:
            a, b = samples[i], 1
    for start in range(0, len(samples), window):
        chunk = samples[start : start + window]
        a, b = chunk[0], 1
        found = False
        for j in range(1, len(chunk)):
            if chunk[j] == a:
                b += 1
                if b >= apt_cutoff:
                    failures.append((start + j + 1, 1, HealthTest.ADAPTIVE_PROPORTION))
                    found = True
                    break
        if found:
            break
    if not failures:
        return None
    index, _, test = min(failures)
    return test, index


def feed_until_failure(tests: HealthTests, data: bytes) -> HealthTestFailure | None:
    try:
        tests.feed(data)
    except HealthTestFailure as failure:
        return failure
    return None


# --- cut-offs -----------------------------------------------------------------------------


def test_cutoffs_match_published_values_for_full_entropy_bits_and_bytes() -> None:
    assert adaptive_proportion_window(SampleKind.BIT) == APT_WINDOW_BINARY == 1024
    assert adaptive_proportion_window(SampleKind.BYTE) == APT_WINDOW_NON_BINARY == 512
    bits = HealthTests(1, SampleKind.BIT)
    assert (bits.rct_cutoff, bits.apt_window, bits.apt_cutoff) == (21, 1024, 589)
    octets = HealthTests(8, SampleKind.BYTE)
    assert (octets.rct_cutoff, octets.apt_window, octets.apt_cutoff) == (4, 512, 13)


# SP 800-90B Table 2, W = 512 column, with the RCT cut-offs for the same H; the same
# numbers appear in OpenSSL's crng_test (rct_c[] / apt_c[]).
@pytest.mark.parametrize(
    ("h", "rct", "apt"),
    [
        (0.5, 41, 410),
        (1, 21, 311),
        (2, 11, 177),
        (3, 8, 103),
        (4, 6, 62),
        (5, 5, 39),
        (6, 5, 25),
        (7, 4, 18),
        (8, 4, 13),
    ],
)
def test_non_binary_cutoffs_match_table(h: float, rct: int, apt: int) -> None:
    assert repetition_count_cutoff(h) == rct
    assert adaptive_proportion_cutoff(h, 512) == apt


def test_cutoffs_fall_as_claimed_entropy_rises() -> None:
    grid = [Fraction(k, 8) for k in range(1, 65)]
    rct = [repetition_count_cutoff(h) for h in grid]
    apt_bytes = [adaptive_proportion_cutoff(h, 512) for h in grid]
    apt_bits = [adaptive_proportion_cutoff(h, 1024) for h in grid if h <= 1]
    for series in (rct, apt_bytes, apt_bits):
        assert all(x >= y for x, y in itertools.pairwise(series))
    # The cut-off sits above the mean W·2^-H and never beyond W + 1.
    for h, c in zip(grid, apt_bytes, strict=True):
        assert 512 * 2 ** -float(h) < c <= 513


@pytest.mark.parametrize("h", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("window", [512, 1024])
def test_decimal_and_exact_cutoff_paths_agree(h: int, window: int) -> None:
    exact = adaptive_proportion_cutoff(h, window)
    assert entropy._apt_cutoff_decimal(Fraction(h), window, 20) == exact


def test_float_claims_are_taken_as_written() -> None:
    # 20 / 0.1 is 200.00000000000003 in binary floating point; the claim means 1/10.
    assert repetition_count_cutoff(0.1) == 201
    assert repetition_count_cutoff(Fraction(1, 10)) == 201


@pytest.mark.parametrize(
    ("h", "kind"), [(0, SampleKind.BYTE), (8.5, SampleKind.BYTE), (1.5, SampleKind.BIT)]
)
def test_impossible_claims_are_refused(h: float, kind: SampleKind) -> None:
    with pytest.raises(ValueError, match="min-entropy"):
        HealthTests(h, kind)


# --- repetition count test (§4.4.1) -------------------------------------------------------


@pytest.mark.parametrize("h", [0.5, 1, 2, 4, 8])
def test_stuck_byte_source_trips_rct_exactly_at_sample_c(h: float) -> None:
    tests = HealthTests(h, SampleKind.BYTE)
    c = tests.rct_cutoff
    for _ in range(c - 1):
        tests.feed(b"\xa5")
    with pytest.raises(HealthTestFailure) as caught:
        tests.feed(b"\xa5")
    assert caught.value.test is HealthTest.REPETITION_COUNT
    assert caught.value.sample_index == c
    assert caught.value.cutoff == c
    assert tests.failure is caught.value


@given(
    value=st.integers(0, 255),
    h=st.sampled_from([0.5, 1, 2, 3, 4, 5, 6, 7, 8]),
    chunk=st.integers(1, 64),
)
def test_stuck_source_trips_rct_at_c_however_it_is_chunked(
    value: int, h: float, chunk: int
) -> None:
    tests = HealthTests(h, SampleKind.BYTE)
    assert tests.rct_cutoff < tests.apt_cutoff  # so RCT, not APT, must be what trips
    stream = bytes([value]) * (tests.rct_cutoff + 10)
    failure = None
    for start in range(0, len(stream), chunk):
        failure = feed_until_failure(tests, stream[start : start + chunk])
        if failure is not None:
            break
    assert failure is not None
    assert (failure.test, failure.sample_index) == (HealthTest.REPETITION_COUNT, tests.rct_cutoff)


@pytest.mark.parametrize("stuck", [b"\x00", b"\xff"])
def test_stuck_bit_source_trips_rct_at_bit_21(stuck: bytes) -> None:
    tests = HealthTests(1, SampleKind.BIT)
    tests.feed(stuck * 2)  # 16 bits
    failure = feed_until_failure(tests, stuck * 2)
    assert failure is not None
    assert (failure.test, failure.sample_index) == (HealthTest.REPETITION_COUNT, 21)


def test_failure_latches() -> None:
    tests = HealthTests(8, SampleKind.BYTE)
    first = feed_until_failure(tests, b"\x00" * 4)
    assert first is not None
    for later in (b"", b"\x01\x02\x03"):
        with pytest.raises(HealthTestFailure) as caught:
            tests.feed(later)
        assert caught.value is first
    assert tests.samples_seen == 4


def test_failure_message_names_the_test_not_the_samples() -> None:
    failure = feed_until_failure(HealthTests(8, SampleKind.BYTE), b"\xa5" * 4)
    assert failure is not None
    assert "§4.4.1" in str(failure)
    assert "a5" not in str(failure).lower() and "165" not in str(failure)


# --- adaptive proportion test (§4.4.2) ----------------------------------------------------


def test_biased_byte_source_trips_apt_not_rct() -> None:
    # 0x00 is every fourth sample (p = 1/4 against a claimed 2^-8) and never repeats back
    # to back, so only the APT can see it: the 13th zero of the window is sample 49.
    pattern = bytes(0 if i % 4 == 0 else 1 + i % 251 for i in range(512))
    tests = HealthTests(8, SampleKind.BYTE)
    failure = feed_until_failure(tests, pattern)
    assert failure is not None
    assert failure.test is HealthTest.ADAPTIVE_PROPORTION
    assert failure.sample_index == 1 + 4 * 12 == 49
    assert failure.cutoff == 13


def test_biased_bit_source_trips_apt_not_rct() -> None:
    # 0xEE = 11101110: 75 % ones (claim H = 1 allows ~57.5 %) and runs of at most 3.
    tests = HealthTests(1, SampleKind.BIT)
    failure = feed_until_failure(tests, b"\xee" * 128)
    assert failure is not None
    assert failure.test is HealthTest.ADAPTIVE_PROPORTION
    # The 589th one of the window: 98 bytes hold 588 ones, the 99th byte's first bit is next.
    assert failure.sample_index == 98 * 8 + 1


def test_apt_windows_do_not_overlap() -> None:
    # 12 zeros at the end of window 1 and 12 at the start of window 2: a sliding window
    # would count 23 >= 13, but each non-overlapping window holds only 12.
    def window(zero_positions: set[int]) -> list[int]:
        return [0 if i in zero_positions else 1 + i % 251 for i in range(512)]

    first = window({0, *range(490, 512, 2)})
    second = window(set(range(0, 24, 2)))
    assert first.count(0) == second.count(0) == 12
    stream = first + second
    tests = HealthTests(8, SampleKind.BYTE)
    tests.feed(bytes(stream))
    assert tests.failure is None
    assert reference_first_failure(stream, 4, 13, 512) is None


def test_apt_counts_the_window_s_first_sample() -> None:
    # A is the window's first sample; the same bias against another value passes.
    tests = HealthTests(8, SampleKind.BYTE)
    stream = [7] + [0 if i % 4 == 0 else 1 + i % 251 for i in range(1, 512)]
    tests.feed(bytes(stream))
    assert tests.failure is None


@settings(max_examples=200, deadline=None)
@given(
    samples=st.lists(st.integers(0, 5), min_size=0, max_size=1400)
    | st.lists(st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5, 6, 7]), min_size=0, max_size=1400),
    cuts=st.lists(st.integers(1, 700), max_size=4),
)
def test_health_tests_agree_with_reference_pseudo_code(samples: list[int], cuts: list[int]) -> None:
    tests = HealthTests(8, SampleKind.BYTE)
    expected = reference_first_failure(samples, tests.rct_cutoff, tests.apt_cutoff, 512)
    data = bytes(samples)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    failure = None
    for lo, hi in itertools.pairwise(bounds):
        failure = feed_until_failure(tests, data[lo:hi])
        if failure is not None:
            break
    got = None if failure is None else (failure.test, failure.sample_index)
    assert got == expected


# --- healthy sources pass -----------------------------------------------------------------


def test_good_byte_stream_passes_many_windows_at_full_claim() -> None:
    tests = HealthTests(8, SampleKind.BYTE)
    tests.feed(KeystreamSource(b"healthy bytes").read(64 * 512))
    assert tests.failure is None
    assert tests.samples_seen == 64 * 512


def test_good_bit_stream_passes_many_windows_at_full_claim() -> None:
    tests = HealthTests(1, SampleKind.BIT)
    tests.feed(KeystreamSource(b"healthy bits").read(64 * 1024 // 8))
    assert tests.failure is None
    assert tests.samples_seen == 64 * 1024


def test_os_random_passes_at_the_default_claim() -> None:
    # At H = 4 a full-entropy source false-alarms with probability ~2^-40 per sample.
    tests = HealthTests(entropy.DEFAULT_HARDWARE_MIN_ENTROPY, SampleKind.BYTE)
    tests.feed(os.urandom(32 * 512))
    assert tests.failure is None


# --- EntropySource ------------------------------------------------------------------------


def expected_mix(os_bytes: bytes, hw_bytes: bytes) -> bytes:
    # Independent implementation (stdlib hmac) of the documented conditioning.
    out = b""
    for i in range(0, len(os_bytes), 32):
        key = os_bytes[i : i + 32]
        mac = hmac.new(key, b"doorstep/entropy/mix/v1" + hw_bytes[i : i + 32], hashlib.sha256)
        out += mac.digest()[: len(key)]
    return out


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100])
def test_known_answer_for_mixed_output(n: int) -> None:
    source = EntropySource(KeystreamSource(b"os"), KeystreamSource(b"hw"))
    out = source.read(n)
    os_ref, hw_ref = KeystreamSource(b"os"), KeystreamSource(b"hw")
    hw_ref.read(STARTUP_SAMPLES)  # the start-up samples are tested and discarded
    assert out == expected_mix(os_ref.read(n), hw_ref.read(n))
    assert source.hardware_active


def test_without_hardware_the_os_bytes_are_returned() -> None:
    source = EntropySource(KeystreamSource(b"os"))
    assert source.read(48) == KeystreamSource(b"os").read(48)
    assert not source.hardware_active


def test_healthy_hardware_is_start_up_tested_then_used_every_read() -> None:
    hw = KeystreamSource(b"hw")
    source = EntropySource(KeystreamSource(b"os"), hw)
    for n in (16, 32, 64):
        source.read(n)
    assert hw.calls == [STARTUP_SAMPLES, 16, 32, 64]
    assert source.health.samples_seen == STARTUP_SAMPLES + 112
    assert source.hardware_active


def test_bit_sample_hardware_start_up_covers_1024_bits() -> None:
    hw = KeystreamSource(b"hw bits")
    source = EntropySource(
        KeystreamSource(b"os"), hw, hardware_min_entropy=1, hardware_kind=SampleKind.BIT
    )
    source.read(8)
    assert hw.calls == [STARTUP_SAMPLES // 8, 8]
    assert source.health.samples_seen == STARTUP_SAMPLES + 64


def test_stuck_hardware_is_left_out_with_an_alarm(caplog: pytest.LogCaptureFixture) -> None:
    hw = StuckSource(0xA5)
    os_source = KeystreamSource(b"os")
    source = EntropySource(os_source, hw, hardware_name="test hwrng")
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        first = source.read(32)
        second = source.read(32)
    # The OS bytes alone are returned, and the device is never asked again.
    expected_os = KeystreamSource(b"os")
    assert first == expected_os.read(32)
    assert second == expected_os.read(32)
    assert hw.calls == [STARTUP_SAMPLES]
    assert not source.hardware_active
    alarms = [r for r in caplog.records if r.name == LOGGER]
    assert len(alarms) == 1
    assert alarms[0].levelno == logging.ERROR
    message = alarms[0].getMessage()
    assert "test hwrng" in message and "repetition count" in message
    text = caplog.text.lower()
    for leaked in ("a5", "165", "\\xa5", "¥"):
        assert leaked not in text


def test_hardware_that_turns_stuck_later_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    hw = TurnsStuckSource(good_bytes=STARTUP_SAMPLES + 64)
    source = EntropySource(KeystreamSource(b"os"), hw)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        source.read(64)  # still healthy: mixed
        assert source.hardware_active
        out = source.read(64)  # stuck from here: trips RCT at the 6th 0x5A
        source.read(64)
    expected_os = KeystreamSource(b"os")
    expected_os.read(64)
    assert out == expected_os.read(64)  # the read that tripped falls back to the OS bytes
    assert hw.calls == [STARTUP_SAMPLES, 64, 64]
    assert not source.hardware_active
    failure = source.health.failure
    assert failure is not None
    assert failure.test is HealthTest.REPETITION_COUNT
    assert failure.sample_index == STARTUP_SAMPLES + 64 + 6
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.ERROR]
    assert "5a" not in caplog.text.lower()


@pytest.mark.parametrize("hw_factory", [BrokenSource, ShortSource])
def test_unreadable_hardware_is_left_out_with_a_warning(
    hw_factory: type[BrokenSource] | type[ShortSource], caplog: pytest.LogCaptureFixture
) -> None:
    hw = hw_factory()
    source = EntropySource(KeystreamSource(b"os"), hw)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert source.read(20) == KeystreamSource(b"os").read(20)
        source.read(20)
    assert len(hw.calls) == 1
    assert not source.hardware_active
    assert [(r.name, r.levelno) for r in caplog.records] == [(LOGGER, logging.WARNING)]


class OverlongSource:
    def read(self, n: int, /) -> bytes:
        return os.urandom(n + 1)


@pytest.mark.parametrize("os_factory", [BrokenSource, ShortSource, OverlongSource])
def test_failing_os_source_fails_closed_even_with_healthy_hardware(
    os_factory: type[BrokenSource] | type[ShortSource] | type[OverlongSource],
) -> None:
    hw = KeystreamSource(b"hw")
    source = EntropySource(os_factory(), hw)
    for _ in range(2):
        with pytest.raises(EntropyError) as caught:
            source.read(32)
        assert caught.value.code == "entropy_unavailable"
    assert hw.calls == []  # nothing drawn, nothing returned


def test_os_source_failing_after_success_still_fails_closed() -> None:
    class Flaky:
        def __init__(self) -> None:
            self.fail = False

        def read(self, n: int, /) -> bytes:
            if self.fail:
                raise OSError(4, "Interrupted system call")
            return os.urandom(n)

    flaky = Flaky()
    source = EntropySource(flaky, KeystreamSource(b"hw"))
    assert len(source.read(16)) == 16
    flaky.fail = True
    with pytest.raises(EntropyError, match="Interrupted"):
        source.read(16)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000))
def test_output_length_is_exact(n: int) -> None:
    source = EntropySource(hardware=KeystreamSource(b"hw"))
    assert len(source.read(n)) == n


@pytest.mark.parametrize("with_hardware", [False, True])
def test_two_reads_differ(with_hardware: bool) -> None:
    source = EntropySource(hardware=KeystreamSource(b"hw") if with_hardware else None)
    assert source.read(32) != source.read(32)


def test_negative_length_is_refused() -> None:
    with pytest.raises(ValueError):
        EntropySource().read(-1)


# --- system wiring ------------------------------------------------------------------------


def test_absent_device_is_silently_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        source = entropy_from_system(hardware_path=str(tmp_path / "hwrng"))
        assert len(source.read(32)) == 32
    assert not source.hardware_active
    assert caplog.records == []


def test_readable_device_is_mixed_in(tmp_path: Path) -> None:
    device = tmp_path / "hwrng"
    device.write_bytes(os.urandom(STARTUP_SAMPLES + 64))
    source = entropy_from_system(hardware_path=str(device))
    assert source.hardware_active
    assert len(source.read(64)) == 64
    assert source.hardware_active
    assert source.health.samples_seen == STARTUP_SAMPLES + 64


def test_device_source_reports_eof_as_a_short_read(tmp_path: Path) -> None:
    device = tmp_path / "hwrng"
    device.write_bytes(b"\x01\x02\x03")
    assert DeviceSource(str(device)).read(8) == b"\x01\x02\x03"


def test_default_entropy_is_process_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entropy, "_default", None)
    monkeypatch.setattr(entropy, "_default_min_entropy", None)
    source = default_entropy()
    assert default_entropy() is source
    assert default_entropy(entropy.DEFAULT_HARDWARE_MIN_ENTROPY) is source
    assert source.hardware_active == os.access("/dev/hwrng", os.R_OK)
    with pytest.raises(ValueError, match="already configured"):
        default_entropy(2)
