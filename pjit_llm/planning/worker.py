"""Compiles in a worker process, so that a compiler abort (XLA's CHECK failures end the
process, past any Python handler) costs the plan one candidate rather than the whole plan.

One spawned worker compiles candidate after candidate on its own emulated CPU devices (what
compiled.py's `analyse` needs; the calling process may hold real GPUs for calibration). When
it dies, the candidate it was compiling comes back refused, naming the compiler's last fatal
line (the worker's stderr goes to a file, so that an abort's stack trace does not run through
the plan's table), and the next candidate starts a fresh worker. A worker for a GPU kind
builds GPU programs (gpu_program.py), which changes how JAX lowers in its process alone."""

import multiprocessing
import os
import re
import tempfile

from pjit_llm.config import Config
from pjit_llm.parallel.mesh import use_emulated_devices
from pjit_llm.planning import gpu_program
from pjit_llm.planning.compiled import analyse


def _serve(conn, devices: int, log: str, gpu: bool) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)  # XLA writes to the file descriptor, past Python's sys.stderr
    os.close(fd)
    use_emulated_devices(devices)  # before anything starts JAX's backend in this process
    if gpu:
        gpu_program.prepare()
    while True:
        job = conn.recv()
        if job is None:
            return
        cfg, count, scores = job
        conn.send(analyse(cfg, count, scores, gpu))


class CompileWorker:
    def __init__(self, devices: int, gpu: bool = False):
        """`gpu`: compile the programs a GPU would run (gpu_program.py)."""
        self.devices, self.gpu = devices, gpu
        self.process = self.conn = None
        fd, self.log = tempfile.mkstemp(prefix="pjit_llm_plan_", suffix=".log")
        os.close(fd)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, self.devices, self.log, self.gpu), daemon=True)
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
            return {"refused": f"the compiler aborted on it ({self._last_fatal()}exit status "
                               f"{code})", "aborted": True}

    def _last_fatal(self) -> str:
        """XLA's last fatal line (`F1204 12:00:00.0 123 file.cc:42] message`): 'message; '."""
        try:
            with open(self.log, errors="replace") as f:
                fatal = [line for line in f if re.match(r"F\d{4} ", line)]
        except OSError:
            return ""
        return fatal[-1].split("] ", 1)[-1].strip() + "; " if fatal else ""

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=10)
        self.process = None
        if os.path.exists(self.log):
            os.remove(self.log)
