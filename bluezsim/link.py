"""One simulated LE link: ordered, timed ATT PDU delivery in both directions.

A :class:`Link` owns two FIFO pipes. Central → peripheral PDUs (requests,
write commands, CCCD writes) are delivered one connection interval after they
were submitted; peripheral → central PDUs (responses, notifications) at the
next connection event, the event grid being anchored at the last
central → peripheral delivery (see :mod:`bluezsim.timing`). Each pipe runs its
actions strictly in order, which gives ordered notifications and a peripheral
that handles one PDU at a time. The ``request_lock`` enforces ATT's one
outstanding request per link.

A link can die loudly (:meth:`close`: pending operations fail with BlueZ's
"Not connected") or silently (:meth:`go_silent`: PDUs vanish until the
supervision timeout closes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bluezsim import att
from bluezsim.timing import Clock, next_event, sleep_until

log = logging.getLogger(__name__)


@dataclass
class _Pdu:
    at: float
    action: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any] = field(repr=False)


class Link:
    """A connection between a central and a peripheral adapter."""

    def __init__(
        self,
        central: Any,
        peripheral: Any,
        *,
        mtu: int,
        interval: float,
        timed: bool,
        clock: Clock,
    ) -> None:
        self.central = central
        self.peripheral = peripheral
        self.mtu = att.check_mtu(mtu)
        self.interval = interval
        self.timed = timed
        self.request_lock = asyncio.Lock()
        self.alive = True
        self.silent = False
        self.closed = asyncio.Event()
        self._clock = clock
        self._anchor = clock()
        self._last_c2p = 0.0
        self._last_p2c = 0.0
        self._c2p: asyncio.Queue[_Pdu] = asyncio.Queue()
        self._p2c: asyncio.Queue[_Pdu] = asyncio.Queue()
        self._pending: set[asyncio.Future[Any]] = set()
        self._tasks = [
            asyncio.create_task(self._pump(self._c2p, anchor=True)),
            asyncio.create_task(self._pump(self._p2c, anchor=False)),
        ]

    @property
    def hop(self) -> float:
        return self.interval if self.timed else 0.0

    def to_peripheral(self, action: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
        """Queue a central → peripheral PDU; the future resolves to the action's result."""
        now = self._clock()
        at = max(now + self.hop, self._last_c2p)
        self._last_c2p = at
        return self._submit(self._c2p, at, action)

    def to_central(self, action: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
        """Queue a peripheral → central PDU for the next connection event."""
        now = self._clock()
        at = next_event(self._anchor, self.hop, now) if self.timed else now
        at = max(at, self._last_p2c)
        self._last_p2c = at
        return self._submit(self._p2c, at, action)

    async def round_trip(self, action: Callable[[], Awaitable[Any]]) -> Any:
        """A request and its response: the action runs on the peripheral side."""
        result = await self.to_peripheral(action)
        await self.to_central(_nothing)
        return result

    def _submit(
        self, queue: asyncio.Queue[_Pdu], at: float, action: Callable[[], Awaitable[Any]]
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.alive:
            future.set_exception(att.not_connected())
            return future
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        future.add_done_callback(_consume_exception)
        queue.put_nowait(_Pdu(at, action, future))
        return future

    async def _pump(self, queue: asyncio.Queue[_Pdu], *, anchor: bool) -> None:
        while True:
            pdu = await queue.get()
            if self.timed:
                await sleep_until(pdu.at, self._clock)
            if anchor:
                self._anchor = max(pdu.at, self._anchor) if self.timed else self._clock()
            if self.silent:
                continue  # lost on air; the future fails when the link closes
            if pdu.future.done():
                continue
            try:
                result = await pdu.action()
            except asyncio.CancelledError:
                if not pdu.future.done():
                    pdu.future.set_exception(att.not_connected())
                raise
            except BaseException as exc:  # handed to the waiting caller
                if not pdu.future.done():
                    pdu.future.set_exception(exc)
            else:
                if not pdu.future.done():
                    pdu.future.set_result(result)

    def go_silent(self) -> None:
        """The radio link stops carrying PDUs (supervision timeout pending)."""
        self.silent = True

    async def close(self) -> None:
        """Tear the link down; queued and pending operations fail with NotConnected."""
        if not self.alive:
            return
        self.alive = False
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for future in list(self._pending):
            if not future.done():
                future.set_exception(att.not_connected())
        self.closed.set()


def _consume_exception(future: asyncio.Future[Any]) -> None:
    # Failures nobody awaits any more (e.g. a fire-and-forget write command)
    # must not be reported as "exception was never retrieved".
    if not future.cancelled():
        future.exception()


async def _nothing() -> None:
    return None
