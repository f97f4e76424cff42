"""Compiles in a worker process, so that a compiler abort (XLA's CHECK failures end the
process, past any Python handler) costs the plan one candidate rather than the whole plan.

One spawned worker compiles candidate after candidate on its own emulated CPU devices (what
compiled.py's `analyse` needs; the calling process may hold real GPUs for calibration). When
it dies, the candidate it was compiling comes back refused, naming the exit, and the next
candidate starts a fresh worker."""

import multiprocessing

from pjit_llm.config import Config
from pjit_llm.parallel.mesh import use_emulated_devices
from pjit_llm.planning.compiled import analyse


def _serve(conn, devices: int) -> None:
    use_emulated_devices(devices)  # before anything starts JAX's backend in this process
    while True:
        job = conn.recv()
        if job is None:
            return
        cfg, count, scores = job
        conn.send(analyse(cfg, count, scores))


class CompileWorker:
    def __init__(self, devices: int):
        self.devices = devices
        self.process = self.conn = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.devices), daemon=True)
        self.process.start()
        child.close()

    def analyse(self, cfg: Config, devices: int, scores: bool = False) -> dict:
        if self.process is None or not self.process.is_alive():
            self._start()
        try:
            self.conn.send((cfg, devices, scores))
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join()
            code = self.process.exitcode
            self.process = None
            return {"refused": f"the compiler aborted on it (exit status {code})", "aborted": True}

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=10)
        self.process = None
