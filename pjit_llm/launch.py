"""`python -m pjit_llm.launch --processes N [--emulate-devices D] [--one-gpu-each] -- ARGS`

Starts N processes of `python -m pjit_llm.train ARGS` on this machine, joined by JAX's
distributed runtime through JAX_COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID on a free
local port. For CPU runs each process emulates D devices; for GPUs, `--one-gpu-each` gives
process i GPU i. SIGTERM/SIGINT are passed on (the processes save and stop together).
If one process fails, the others get `--grace` seconds to notice and stop, then are killed;
the launcher exits with the first failure's status (128 + N for a process killed by signal N).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from pjit_llm.errors import UserError, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, args: list[str], emulate_devices: int = 0, one_gpu_each: bool = False,
           port: int | None = None, grace: float = 90.0, module: str = "pjit_llm.train") -> int:
    port = port or free_port()
    children = []
    for i in range(processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   NUM_PROCESSES=str(processes), PROCESS_ID=str(i))
        if one_gpu_each:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        extra = ["--emulate-devices", str(emulate_devices)] if emulate_devices else []
        children.append(subprocess.Popen([sys.executable, "-m", module, *args, *extra], env=env))

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status, failed_at, reported = 0, None, set()
        while True:
            # Poll every child each round: a failure of any of them starts the grace period.
            running = [c for c in children if c.poll() is None]
            for i, c in enumerate(children):
                if c.returncode not in (None, 0) and i not in reported:
                    reported.add(i)
                    print(f"launch: process {i} {describe_exit(c.returncode)}", file=sys.stderr,
                          flush=True)
                    if not status:
                        status, failed_at = exit_status(c.returncode), time.monotonic()
            if not running:
                return status
            if failed_at and time.monotonic() - failed_at > grace:
                for i, c in enumerate(children):
                    if c.returncode is None and i not in reported:
                        reported.add(i)
                        print(f"launch: killing process {i}, still running {grace:g}s after the "
                              "first failure", file=sys.stderr, flush=True)
                        c.kill()
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for c in children:  # never leave a process behind
            if c.poll() is None:
                c.kill()
            c.wait()


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (status {exit_status(returncode)})"
    return f"exited with status {returncode}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pjit_llm.launch", description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--emulate-devices", type=int, default=0, metavar="D",
                   help="CPU devices each process emulates")
    p.add_argument("--one-gpu-each", action="store_true", help="process i sees only GPU i")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("--grace", type=float, default=90.0,
                   help="seconds the others get to stop after one fails")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of pjit_llm.train")
    args = p.parse_args(argv)
    if args.processes < 1:
        raise UserError("--processes must be at least 1")
    train_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    sys.exit(launch(args.processes, train_args, args.emulate_devices, args.one_gpu_each,
                    args.port, args.grace))


def cli() -> None:
    """The console script: one-line errors, exit status 2."""
    run_cli(main)


if __name__ == "__main__":
    cli()
