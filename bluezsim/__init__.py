"""bluezsim — a simulated BlueZ on a private D-Bus, for radio-less machines.

Unmodified bleak (central) and bless (peripheral) run their real Linux BlueZ
backends against it, in one process or many.

Public API:

* :class:`Simulator` — ``async with Simulator() as sim:`` in-process;
* :class:`SimProcess` — runs ``doorstep sim`` as a subprocess and gives a
  :class:`SimControl` proxy to its ``org.doorstep.Sim1`` control interface;
* :class:`TimingModel` — connection/advertising interval model;
* :class:`EchoPeripheral` (in :mod:`bluezsim.echo_peripheral`) — a reference
  DS1 bless peripheral.
"""

from bluezsim.process import SimControl, SimProcess
from bluezsim.simulator import Simulator
from bluezsim.timing import TimingModel

__all__ = ["SimControl", "SimProcess", "Simulator", "TimingModel"]
