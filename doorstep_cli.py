"""The ``doorstep`` console command: one subcommand per role.

Each role's package provides ``add_parser(subparsers)``; this module only
collects them so a role can be installed and tested on its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module providing add_parser)
ROLES: tuple[tuple[str, str], ...] = (
    ("sim", "bluezsim.cli"),
    ("cloud", "cloud.cli"),
    ("device", "device.cli"),
    ("phone", "phone.cli"),
    ("hub", "hub.cli"),
    ("demo", "demo.cli"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doorstep", description="Doorstep BLE onboarding (DS1) — one subcommand per role."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in ROLES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue  # role not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result = func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
