"""What the commands' command lines share: --emulate-devices and the key.sub=value overrides."""

import argparse

from pjit_llm.errors import UserError


def command_parser(prog: str, doc: str,
                   overrides_help: str | None = None) -> argparse.ArgumentParser:
    """A parser with the options every command that computes takes; the command adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0])
    add_shared(p, overrides_help)
    return p


def add_shared(p: argparse.ArgumentParser, overrides_help: str | None = None) -> None:
    p.add_argument("--emulate-devices", type=int, metavar="N",
                   help="run on N emulated CPU devices (sets mesh.emulate_devices)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=overrides_help)


def emulated(args: argparse.Namespace) -> list[str]:
    """The overrides, with mesh.emulate_devices when --emulate-devices was given."""
    if args.emulate_devices is None:
        return list(args.overrides)
    if args.emulate_devices < 1:
        raise UserError(f"--emulate-devices {args.emulate_devices} is not a number of devices; "
                        "give 1 or more, or leave it out to use the machine's devices")
    return [*args.overrides, f"mesh.emulate_devices={args.emulate_devices}"]
