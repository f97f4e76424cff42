"""Shared set-up. Every test sees 8 emulated CPU devices (set before JAX initialises a backend).

A temporary directory per pytest process (gone at its end), inherited by every process a
test starts, holds TFDS's default data directory, so no test writes under
~/tensorflow_datasets. One directory for the whole test run, made by the process that starts
the others (`pytest -n 2`'s controller, or plain pytest), holds JAX's persistent compilation
cache and the trained run the tests of the commands share: the xdist workers and every
process they start compile each of the many runs of the same tiny model once between them,
and train that run once.

Tests under tests/e2e start real processes (`run_module`) and are marked `slow`; everything
else runs in this process.

Tests marked `gpu` need the machine's own GPU: `PJIT_LLM_TEST_GPU=1 python -m pytest -m gpu`
runs them there (and skips the rest, which assume the 8 emulated CPU devices); without
PJIT_LLM_TEST_GPU they are skipped."""

import dataclasses
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ON_GPU = os.environ.get("PJIT_LLM_TEST_GPU") == "1"
if ON_GPU:
    # The processes the tests start need the card's memory too: take it as needed, not 75 %
    # of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
else:
    os.environ["JAX_PLATFORMS"] = "cpu"
SESSION_DIR = Path(tempfile.mkdtemp(prefix="pjit-llm-tests-"))
# An xdist worker inherits the run's directory from the controller, which made it when this
# module was first imported (before the workers started); any other pytest makes its own.
RUN_DIR_VARIABLE = "PJIT_LLM_TESTS_RUN_DIR"
OWNS_RUN_DIR = not (os.environ.get("PYTEST_XDIST_WORKER") and RUN_DIR_VARIABLE in os.environ)
if OWNS_RUN_DIR:
    os.environ[RUN_DIR_VARIABLE] = tempfile.mkdtemp(prefix="pjit-llm-tests-run-")
RUN_DIR = Path(os.environ[RUN_DIR_VARIABLE])
# Both are read once, when TFDS or JAX is first imported: set them first. TFDS's directory
# stays per process: two workers preparing the same dataset at once would race.
os.environ["TFDS_DATA_DIR"] = str(SESSION_DIR / "tensorflow_datasets")
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(RUN_DIR / "jax_compilation_cache")
# XLA:CPU compiles the tests' programs without LLVM's optimisation passes: the same HLO
# programs, shardings and collectives, compiled in about half the CPU time (compiling is most
# of the suite's time), into machine code that runs slower, which the tiny models do not
# notice. Floating-point results may differ from an optimised build's in the last bits, as
# they do between meshes. Every process a test starts gets the flag too (process_env). A
# level given in XLA_FLAGS wins: --xla_backend_optimization_level=3 is XLA's default. On a
# GPU the tests measure the kernels a user gets: no flag.
LEVEL = "--xla_backend_optimization_level="
_flags = os.environ.get("XLA_FLAGS", "").split()
TEST_XLA_FLAGS = next((flag for flag in _flags if flag.startswith(LEVEL)),
                      "" if ON_GPU else LEVEL + "0")
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys(f for f in [*_flags, TEST_XLA_FLAGS] if f))
# Cache every compilation, not only those over a second: the tests build the same tiny steps
# and generators many times over.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from pjit_llm.config import load_config  # noqa: E402
from pjit_llm.parallel.axes import AXIS_NAMES  # noqa: E402
from pjit_llm.training.build import Components, build  # noqa: E402

# A model small enough to compile in seconds whose every sharded dimension divides by 8
# (kv heads by 4: the tensor-parallel meshes use tensor <= 4 with grouped-query attention).
TINY = ["model.num_layers=2", "model.embed_dim=64", "model.num_heads=8", "model.num_kv_heads=4",
        "model.mlp_dim=128", "model.vocab_size=384", "data.seq_len=32", "data.batch_size=16",
        "optimizer.warmup_steps=1", "train.steps=10"]

E2E = Path(__file__).parent / "e2e"


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
    if OWNS_RUN_DIR:  # the controller ends after its workers
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """`slow` means exactly "starts real processes": every test under tests/e2e. A `gpu` test
    runs only on a GPU, and with PJIT_LLM_TEST_GPU=1 only `gpu` tests run."""
    on_gpu = ON_GPU and jax.default_backend() == "gpu"
    for item in items:
        if E2E in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
        gpu_test = item.get_closest_marker("gpu") is not None
        if gpu_test and not on_gpu:
            item.add_marker(pytest.mark.skip(
                reason="needs a GPU: PJIT_LLM_TEST_GPU=1 python -m pytest -m gpu on a GPU machine"
                if not ON_GPU else f"needs a GPU; JAX's backend is {jax.default_backend()}"))
        elif ON_GPU and not gpu_test:
            item.add_marker(pytest.mark.skip(
                reason="runs on 8 emulated CPU devices: run it without PJIT_LLM_TEST_GPU"))


def tiny_config(*overrides: str):
    return load_config(None, TINY + list(overrides))


def build_on(cfg, mesh: dict[str, int] | None = None, **sizes: int) -> Components:
    """The builder's components for `cfg` on a mesh of these axis sizes (a dict or keywords;
    axes not named have size 1) over the first devices (as many as the sizes multiply to), or
    on one device when none are given."""
    sizes = {**(mesh or {}), **sizes}
    assert set(sizes) <= set(AXIS_NAMES), sizes
    full = {name: sizes.get(name, 1) for name in AXIS_NAMES}
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **full))
    return build(cfg, devices=jax.devices()[:math.prod(full.values())])


def process_env(extra: dict | None = None) -> dict:
    """This process's environment for a child, without the JAX platform and XLA flags set for
    this process (the child picks its own devices) but with the tests' XLA flags, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return {**env, "XLA_FLAGS": TEST_XLA_FLAGS, **(extra or {})}


def run_module(module: str | None, *args: str, cwd=None, env: dict | None = None, code=None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (or `python -c CODE ARGS`) in a fresh process, its output
    captured; `env` is added to `process_env()`. The one way tests run a command."""
    command = ["-c", code] if code is not None else ["-m", module]
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, env=process_env(env),
                          capture_output=True, text=True, timeout=timeout)


def start_module(module: str | None, *args: str, cwd=None, env: dict | None = None,
                 code=None, **popen) -> subprocess.Popen:
    """`python -m MODULE ARGS` (or `python -c CODE ARGS`) started in the background: the
    caller signals it and waits for it with a timeout (`communicate(timeout=)` /
    `wait(timeout=)`)."""
    command = ["-c", code] if code is not None else ["-m", module]
    return subprocess.Popen([sys.executable, *command, *args], cwd=cwd,
                            env=process_env(env), **popen)


def run_cli(*args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m pjit_llm.train ARGS` in a fresh process (its own JAX, its own devices)."""
    return run_module("pjit_llm.train", *args, cwd=cwd, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """A command refused with exit status 2 and one line on stderr that holds `message`."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _keep_xla_flags():
    """Commands called in this process set XLA's GPU defaults in os.environ: put it back."""
    before = os.environ.get("XLA_FLAGS")
    yield
    if before is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = before


@pytest.fixture
def tiny():
    return tiny_config


# One short training run for the whole test run, through the real command on a hybrid mesh,
# that the tests of the commands reading a run directory share (evaluate, generate, export)
# and the tests of what a run writes inspect. Read it; never write into it.
TRAINED_RUN = ["--emulate-devices", "8", *TINY, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
               "train.steps=6", "train.log_every=2", "train.eval_every=3", "train.eval_batches=2",
               "train.peak_tflops=0.5", "train.profile_steps=[2,3]", "data.num_workers=0"]


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    directory: Path  # the run directory
    result: subprocess.CompletedProcess  # the training command's output


@pytest.fixture(scope="session")
def trained_run() -> TrainedRun:
    """Trained by the first xdist worker that asks, under a lock the others wait on; each
    reads the command's output from where that worker left it."""
    where, output = RUN_DIR / "trained", RUN_DIR / "trained.json"
    with open(RUN_DIR / "trained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.exists():
            shutil.rmtree(where, ignore_errors=True)  # what a failed attempt left
            where.mkdir()
            result = run_cli(*TRAINED_RUN, "train.run_dir=run", cwd=where)
            assert result.returncode == 0, result.stderr
            output.write_text(json.dumps([result.args, 0, result.stdout, result.stderr]))
    return TrainedRun(where / "run", subprocess.CompletedProcess(*json.loads(output.read_text())))
