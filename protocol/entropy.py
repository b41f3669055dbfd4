"""The cloud's entropy source for identifiers and keys.

Every value comes from the operating system's CSPRNG (``os.getrandom``). When a
hardware RNG is present (``/dev/hwrng``), its output is health-tested and mixed
in as a supplement; it never replaces the OS bytes.

Implements, for the hardware samples, the continuous health tests of
NIST SP 800-90B §4.4:

* §4.4.1 Repetition Count Test (RCT): cut-off ``C = 1 + ceil(-log2(α) / H)``.
* §4.4.2 Adaptive Proportion Test (APT): non-overlapping windows of
  ``W = 1024`` binary samples or ``W = 512`` non-binary samples, cut-off
  ``C = 1 + CRITBINOM(W, 2^-H, 1 - α)``, computed exactly (integer arithmetic
  when ``2^-H`` is rational, 120-digit decimals otherwise).

with ``α = 2^-20`` and the §4.3 start-up test over the first 1024 samples.

Failure policy::

    OS source raises / returns short  -> EntropyError, no bytes (fail closed)
    hardware raises / returns short   -> hardware left out for good, WARNING alarm
    hardware fails RCT or APT         -> hardware left out for good, ERROR alarm

Errors::

    protocol.errors.EntropyError   the OS source failed; nothing was returned
    HealthTestFailure              a hardware source tripped RCT or APT (.test);
                                   EntropySource handles it, callers never see it

Alarms go to the ``doorstep.entropy`` logger and never carry sample values.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
import threading
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Final, NoReturn, Protocol

from cryptography.hazmat.primitives import hashes, hmac

from protocol.errors import EntropyError

__all__ = [
    "APT_WINDOW_BINARY",
    "APT_WINDOW_NON_BINARY",
    "DEFAULT_ALPHA_EXPONENT",
    "DEFAULT_HARDWARE_MIN_ENTROPY",
    "DEFAULT_HARDWARE_PATH",
    "STARTUP_SAMPLES",
    "DeviceSource",
    "EntropyError",
    "EntropySource",
    "HealthTest",
    "HealthTestFailure",
    "HealthTests",
    "OsRandomSource",
    "RawSource",
    "SampleKind",
    "adaptive_proportion_cutoff",
    "adaptive_proportion_window",
    "default_entropy",
    "entropy_from_system",
    "repetition_count_cutoff",
]

logger: Final = logging.getLogger("doorstep.entropy")

#: α = 2^-DEFAULT_ALPHA_EXPONENT, the false-positive probability per test (SP 800-90B §4.4).
DEFAULT_ALPHA_EXPONENT: Final = 20
#: SP 800-90B §4.4.2: window size for binary samples.
APT_WINDOW_BINARY: Final = 1024
#: SP 800-90B §4.4.2: window size for non-binary samples.
APT_WINDOW_NON_BINARY: Final = 512
#: SP 800-90B §4.3: start-up tests run over at least 1024 consecutive samples.
STARTUP_SAMPLES: Final = 1024
DEFAULT_HARDWARE_PATH: Final = "/dev/hwrng"
#: Claimed min-entropy per byte sample of an unknown hardware RNG. Deliberately
#: below the 8 bits a good device delivers: a claim under the true value only
#: loosens the cut-offs (RCT 6, APT 58/512), so a healthy device essentially never
#: raises a false alarm, while stuck or grossly biased output is still caught.
#: The claim is never credited: the output's strength rests on the OS bytes.
DEFAULT_HARDWARE_MIN_ENTROPY: Final = 4.0

_MIX_LABEL: Final = b"doorstep/entropy/mix/v1"
_MIX_BLOCK: Final = 32  # SHA-256 output size
_DECIMAL_DIGITS: Final = 120


class SampleKind(enum.Enum):
    """How a hardware source's bytes are split into SP 800-90B samples."""

    #: Each byte is eight binary samples, most significant bit first.
    BIT = "bit"
    #: Each byte is one non-binary sample.
    BYTE = "byte"


class HealthTest(enum.Enum):
    """The continuous health tests of SP 800-90B §4.4."""

    REPETITION_COUNT = "repetition count test (SP 800-90B §4.4.1)"
    ADAPTIVE_PROPORTION = "adaptive proportion test (SP 800-90B §4.4.2)"


class HealthTestFailure(Exception):
    """A health test tripped; the source it watches must no longer be used.

    Carries which test tripped and where, never the sample values.
    """

    def __init__(self, test: HealthTest, sample_index: int, cutoff: int) -> None:
        super().__init__(f"{test.value} tripped at sample {sample_index} (cut-off {cutoff})")
        self.test: Final = test
        #: 1-based index, counted over every sample fed since the tests were created.
        self.sample_index: Final = sample_index
        self.cutoff: Final = cutoff


class RawSource(Protocol):
    """A source of raw random bytes.

    ``read(n)`` returns exactly ``n`` bytes or raises ``OSError``; any other
    length is treated as a failure by :class:`EntropySource`.
    """

    def read(self, n: int, /) -> bytes: ...


# --- cut-offs (SP 800-90B §4.4.1, §4.4.2) ---------------------------------------------


def _as_fraction(value: float | Fraction) -> Fraction:
    # repr() round-trips the literal the caller wrote (0.1 -> 1/10), so that
    # ceil(20 / 0.1) is 200 and not 201 from binary floating-point error.
    if isinstance(value, Fraction | int):
        return Fraction(value)
    return Fraction(repr(value))


def _check_min_entropy(min_entropy: float | Fraction, kind: SampleKind) -> Fraction:
    h = _as_fraction(min_entropy)
    top = 1 if kind is SampleKind.BIT else 8
    if not 0 < h <= top:
        raise ValueError(f"claimed min-entropy must be in (0, {top}] for {kind.value} samples")
    return h


def repetition_count_cutoff(
    min_entropy: float | Fraction, alpha_exponent: int = DEFAULT_ALPHA_EXPONENT
) -> int:
    """SP 800-90B §4.4.1: ``C = 1 + ceil(-log2(α) / H)`` with ``α = 2^-alpha_exponent``."""
    h = _as_fraction(min_entropy)
    if h <= 0:
        raise ValueError("claimed min-entropy must be positive")
    if alpha_exponent < 1:
        raise ValueError("alpha_exponent must be at least 1")
    return 1 + math.ceil(Fraction(alpha_exponent) / h)


def adaptive_proportion_window(kind: SampleKind) -> int:
    """SP 800-90B §4.4.2: W = 1024 for binary samples, 512 otherwise."""
    return APT_WINDOW_BINARY if kind is SampleKind.BIT else APT_WINDOW_NON_BINARY


def adaptive_proportion_cutoff(
    min_entropy: float | Fraction,
    window: int,
    alpha_exponent: int = DEFAULT_ALPHA_EXPONENT,
) -> int:
    """SP 800-90B §4.4.2: ``C = 1 + CRITBINOM(W, 2^-H, 1 - α)``.

    CRITBINOM returns the smallest ``k`` with ``P(X <= k) >= 1 - α`` for
    ``X ~ Binomial(W, 2^-H)``; equivalently ``C`` is the smallest ``c`` with
    ``P(X >= c) <= α``.
    """
    h = _as_fraction(min_entropy)
    if h <= 0:
        raise ValueError("claimed min-entropy must be positive")
    if window < 1 or alpha_exponent < 1:
        raise ValueError("window and alpha_exponent must be at least 1")
    if h.denominator == 1:
        return _apt_cutoff_exact(int(h), window, alpha_exponent)
    return _apt_cutoff_decimal(h, window, alpha_exponent)


@functools.cache
def _apt_cutoff_exact(h: int, window: int, alpha_exponent: int) -> int:
    # With p = 1/2^h, P(X = j) = comb(W, j) (2^h - 1)^(W - j) / 2^(hW): the tail
    # test P(X >= c) <= 2^-a becomes the integer test 2^a · Σ_{j>=c} ... <= 2^(hW).
    q = (1 << h) - 1
    total = 1 << (h * window)
    tail = 0
    # Grow the upper tail from j = W downwards; the first j whose inclusion
    # pushes it over α is CRITBINOM, so C = j + 1.
    for j in range(window, -1, -1):
        tail += math.comb(window, j) * q ** (window - j)
        if tail << alpha_exponent > total:
            return j + 1
    return 0  # unreachable: the full tail is 1 > α


@functools.cache
def _apt_cutoff_decimal(h: Fraction, window: int, alpha_exponent: int) -> int:
    # 2^-H is irrational for non-integer H; 120 significant digits leave the
    # comparison with α ≈ 1e-6 at least ~100 digits of headroom.
    with localcontext() as ctx:
        ctx.prec = _DECIMAL_DIGITS
        p = Decimal(2) ** (-(Decimal(h.numerator) / Decimal(h.denominator)))
        q = 1 - p
        alpha = Decimal(2) ** -alpha_exponent
        term = p**window  # P(X = W); then P(X = j-1) = P(X = j) · j/(W-j+1) · q/p
        tail = Decimal(0)
        for j in range(window, -1, -1):
            tail += term
            if tail > alpha:
                return j + 1
            term = term * j / (window - j + 1) * q / p
    return 0  # unreachable


# --- continuous health tests ----------------------------------------------------------


class HealthTests:
    """SP 800-90B §4.4 continuous health tests over one noise source's samples.

    Runs the Repetition Count Test and the Adaptive Proportion Test (with
    non-overlapping windows) across every :meth:`feed` call. The first failure
    latches: it is raised, kept in :attr:`failure`, and raised again by every
    later :meth:`feed`.
    """

    def __init__(
        self,
        min_entropy: float | Fraction,
        kind: SampleKind,
        *,
        alpha_exponent: int = DEFAULT_ALPHA_EXPONENT,
    ) -> None:
        h = _check_min_entropy(min_entropy, kind)
        self.kind: Final = kind
        self.min_entropy: Final = h
        self.rct_cutoff: Final = repetition_count_cutoff(h, alpha_exponent)
        self.apt_window: Final = adaptive_proportion_window(kind)
        self.apt_cutoff: Final = adaptive_proportion_cutoff(h, self.apt_window, alpha_exponent)
        self._samples_seen = 0
        self._failure: HealthTestFailure | None = None
        # RCT state: A and B of §4.4.1.
        self._rct_value = -1
        self._rct_count = 0
        # APT state: A and B of §4.4.2, and how many samples of the window are in.
        self._apt_value = -1
        self._apt_count = 0
        self._apt_filled = 0

    @property
    def samples_seen(self) -> int:
        """How many samples have been tested so far."""
        return self._samples_seen

    @property
    def failure(self) -> HealthTestFailure | None:
        """The latched failure, or ``None`` while the source is healthy."""
        return self._failure

    def feed(self, data: bytes) -> None:
        """Test the samples in ``data`` (split according to :attr:`kind`).

        Raises :class:`HealthTestFailure` at the first failing sample, and on
        every call after a failure.
        """
        if self._failure is not None:
            raise self._failure
        if self.kind is SampleKind.BYTE:
            for sample in data:
                self._test(sample)
        else:
            for byte in data:
                for shift in range(7, -1, -1):
                    self._test((byte >> shift) & 1)

    def _test(self, sample: int) -> None:
        self._samples_seen += 1
        # §4.4.1: B counts the run of identical samples, the first included.
        if sample == self._rct_value:
            self._rct_count += 1
        else:
            self._rct_value = sample
            self._rct_count = 1
        # §4.4.2: A is the first sample of each window; B counts A in the window.
        if self._apt_filled == 0:
            self._apt_value = sample
            self._apt_count = 1
        elif sample == self._apt_value:
            self._apt_count += 1
        self._apt_filled += 1
        if self._apt_filled == self.apt_window:
            self._apt_filled = 0

        if self._rct_count >= self.rct_cutoff:
            self._fail(HealthTest.REPETITION_COUNT, self.rct_cutoff)
        if self._apt_count >= self.apt_cutoff:
            self._fail(HealthTest.ADAPTIVE_PROPORTION, self.apt_cutoff)

    def _fail(self, test: HealthTest, cutoff: int) -> NoReturn:
        self._failure = HealthTestFailure(test, self._samples_seen, cutoff)
        raise self._failure


# --- raw sources ----------------------------------------------------------------------


class OsRandomSource:
    """The kernel CSPRNG: ``getrandom(2)`` where available, else ``os.urandom``."""

    def read(self, n: int, /) -> bytes:
        if not hasattr(os, "getrandom"):
            return os.urandom(n)
        # getrandom(2) may return fewer bytes than asked (signal during a large
        # request); that is documented behaviour, so keep asking.
        chunks: list[bytes] = []
        missing = n
        while missing > 0:
            chunk = os.getrandom(missing)
            if not chunk:
                break
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)


class DeviceSource:
    """A character device such as ``/dev/hwrng``, opened for each read."""

    def __init__(self, path: str) -> None:
        self.path: Final = path

    def read(self, n: int, /) -> bytes:
        chunks: list[bytes] = []
        missing = n
        with open(self.path, "rb", buffering=0) as device:
            while missing > 0:
                chunk = device.read(missing)
                if not chunk:  # EOF: the caller sees a short read
                    break
                chunks.append(chunk)
                missing -= len(chunk)
        return b"".join(chunks)

    def __repr__(self) -> str:
        return f"DeviceSource({self.path!r})"


# --- the mixed source -----------------------------------------------------------------


def _mix(os_bytes: bytes, hw_bytes: bytes) -> bytes:
    """Condition OS and hardware bytes into ``len(os_bytes)`` output bytes.

    Each 32-byte output block is HMAC-SHA256 keyed with the matching OS block
    over the matching hardware block (i.e. HKDF-Extract with the OS bytes as
    salt, RFC 5869 §2.2), truncated to the key's length.

    Why keyed by the OS bytes rather than ``os ⊕ H(hw)``: XOR is only as good as
    the independence of the two inputs, and a hardware source that can observe
    or predict the OS output could cancel it. Here the hardware bytes are a
    message to a PRF whose key it does not know, so it cannot steer the output:
    each block keeps the strength of its own OS bytes (8·len bits, at most 256
    per block) however the hardware behaves. If the OS bytes were weak, HMAC is
    still a sound extractor of the hardware bytes' entropy. Blocks rather than
    one HKDF call keep the output's strength from being capped at 256 bits.
    """
    out = bytearray()
    for offset in range(0, len(os_bytes), _MIX_BLOCK):
        key = os_bytes[offset : offset + _MIX_BLOCK]
        mac = hmac.HMAC(key, hashes.SHA256())
        mac.update(_MIX_LABEL)
        mac.update(hw_bytes[offset : offset + _MIX_BLOCK])
        out += mac.finalize()[: len(key)]
    return bytes(out)


def _draw(hardware: RawSource, n: int) -> bytes:
    data = hardware.read(n)
    if not isinstance(data, bytes) or len(data) != n:
        # A short read is an I/O fault and is reported like one.
        raise OSError(0, "short read")
    return data


def _startup_bytes(kind: SampleKind) -> int:
    return STARTUP_SAMPLES if kind is SampleKind.BYTE else STARTUP_SAMPLES // 8


class EntropySource:
    """Random bytes for identifiers and keys, failing closed.

    Every :meth:`read` draws ``n`` bytes from the OS source. A configured
    hardware source is, on first use, start-up tested over 1024 samples
    (SP 800-90B §4.3, discarded), then on every read health-tested and mixed in
    (see :func:`_mix`). The first hardware failure drops it for good.
    Thread-safe: reads are serialised so the health tests see one stream.
    """

    def __init__(
        self,
        os_source: RawSource | None = None,
        hardware: RawSource | None = None,
        *,
        hardware_min_entropy: float | Fraction = DEFAULT_HARDWARE_MIN_ENTROPY,
        hardware_kind: SampleKind = SampleKind.BYTE,
        hardware_name: str = "hardware RNG",
    ) -> None:
        self._os: RawSource = os_source if os_source is not None else OsRandomSource()
        self._hardware: RawSource | None = hardware
        self._health = HealthTests(hardware_min_entropy, hardware_kind)
        self._hardware_name = hardware_name
        self._started = False
        self._lock = threading.Lock()

    @property
    def hardware_active(self) -> bool:
        """Whether a hardware source is configured and has not been dropped."""
        return self._hardware is not None

    @property
    def health(self) -> HealthTests:
        """The health tests watching the hardware source."""
        return self._health

    def read(self, n: int) -> bytes:
        """Return exactly ``n`` random bytes, or raise :class:`~protocol.errors.EntropyError`."""
        if n < 0:
            raise ValueError("n must be non-negative")
        if n == 0:
            return b""
        with self._lock:
            os_bytes = self._read_os(n)
            hw_bytes = self._read_hardware(n)
            if hw_bytes is None:
                return os_bytes
            return _mix(os_bytes, hw_bytes)

    def _read_os(self, n: int) -> bytes:
        try:
            data = self._os.read(n)
        except OSError as exc:
            raise EntropyError(f"OS entropy source failed: {exc.strerror or exc}") from exc
        if not isinstance(data, bytes) or len(data) != n:
            raise EntropyError("OS entropy source returned the wrong number of bytes")
        return data

    def _read_hardware(self, n: int) -> bytes | None:
        hardware = self._hardware
        if hardware is None:
            return None
        try:
            if not self._started:
                # §4.3 start-up test; these samples are discarded.
                self._health.feed(_draw(hardware, _startup_bytes(self._health.kind)))
                self._started = True
            data = _draw(hardware, n)
            self._health.feed(data)
        except HealthTestFailure as failure:
            self._drop(logging.ERROR, f"failed a health test: {failure}")
            return None
        except OSError as exc:
            self._drop(logging.WARNING, f"could not be read ({exc.strerror or type(exc).__name__})")
            return None
        return data

    def _drop(self, level: int, reason: str) -> None:
        self._hardware = None
        logger.log(
            level,
            "entropy alarm: %s %s; left out, continuing with the OS source alone",
            self._hardware_name,
            reason,
        )


def entropy_from_system(
    *,
    hardware_path: str = DEFAULT_HARDWARE_PATH,
    hardware_min_entropy: float | Fraction = DEFAULT_HARDWARE_MIN_ENTROPY,
) -> EntropySource:
    """A new :class:`EntropySource`: the OS plus ``hardware_path`` if readable.

    Presence is checked with ``os.access`` only (no read, so no blocking); an
    absent or unreadable device is silently not used.
    """
    hardware: RawSource | None = None
    if os.access(hardware_path, os.R_OK):
        hardware = DeviceSource(hardware_path)
    return EntropySource(
        OsRandomSource(),
        hardware,
        hardware_min_entropy=hardware_min_entropy,
        hardware_kind=SampleKind.BYTE,
        hardware_name=hardware_path,
    )


_default: EntropySource | None = None
_default_min_entropy: Fraction | None = None
_default_lock = threading.Lock()


def default_entropy(
    hardware_min_entropy: float | Fraction = DEFAULT_HARDWARE_MIN_ENTROPY,
) -> EntropySource:
    """The process-wide :class:`EntropySource` (OS plus ``/dev/hwrng`` if readable).

    The claimed min-entropy per hardware byte is fixed by the first call; a later
    call asking for a different value raises ``ValueError`` rather than silently
    testing against cut-offs the caller did not ask for.
    """
    global _default, _default_min_entropy
    h = _check_min_entropy(hardware_min_entropy, SampleKind.BYTE)
    with _default_lock:
        if _default is None:
            _default = entropy_from_system(hardware_min_entropy=h)
            _default_min_entropy = h
        elif h != _default_min_entropy:
            raise ValueError(
                f"default entropy source already configured with H = {_default_min_entropy}"
            )
        return _default
