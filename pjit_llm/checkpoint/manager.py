"""Orbax checkpoints: training state, data-iterator position and config, saved together.

Saves are asynchronous (the loop goes on while the write finishes) and atomic (Orbax writes
a temporary directory and renames it), so a process killed mid-save leaves the previous
checkpoint intact. Restoring goes straight into the target shardings of whatever mesh the
run has now. Each save records a checksum per array (checksums.py) and each restore
verifies them. A checkpoint shown to be damaged (its arrays no longer match their checksums,
or its files are missing or corrupt: failures.py) is moved aside and the next older one is
used; any other failure to restore stops the run and leaves every checkpoint in place. A save
that fails for want of space stops the run in one line when the loop next waits on it.
Every process takes part in every save and restore.

The training run owns its checkpoint directory: only `Checkpoints` writes, deletes or
renames there. Readers of a run (evaluate, generate, export, init_from) list its steps with
`committed_steps`, which never touches the directory: a live run's save in flight is its
own (a temporary directory), not the reader's to clean up.
"""

import contextlib
import json
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from pjit_llm.checkpoint import checksums, failures
from pjit_llm.config import CheckpointConfig, Config
from pjit_llm.errors import UserError, first_line, out_of_space, quiet_teardown

# Fields whose change makes a checkpoint unusable: they change parameter shapes or the data
# stream the iterator position refers to. Everything else (schedule, steps, logging, mesh,
# remat, compute dtype) may change between runs.
FIXED_FIELDS = {
    "model": ("family", "vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
              "head_dim", "mlp_dim", "tie_embeddings"),
    "data": ("source", "paths", "text_field", "format", "name", "train_split", "tokenizer",
             "tokenizer_path", "packing", "shuffle_window", "num_workers", "shards", "seq_len", "batch_size",
             "val_fraction", "seed"),
}


def committed_steps(directory: Path) -> list[int]:
    """The steps of `directory` whose saves have finished, for a reader of a run that may be
    training now: the directory is only listed (no manager: nothing is created, cleaned up
    or deleted, and no process waits on another), and a save in flight, still in its
    temporary directory, is not listed."""
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []


def _one_replica_saves_replicated_arrays() -> None:
    """On CPU, Orbax has each replica of a replicated array write a slice of it, cut out by a
    small XLA program compiled for each device: 65 compilations (2 s of CPU) at a process's
    first save of the tiny model on 8 devices. One replica writing the whole array (Orbax's
    default on GPUs) compiles nothing, and the checkpoint is read back the same."""
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if jax.default_backend() == "cpu" and hasattr(handler, "_use_replica_parallel"):
        handler._use_replica_parallel = False


class Checkpoints:
    """The training run's own checkpoints: it saves, deletes (retention), sets damaged ones
    aside, and cleans up the temporary directory of a save that a killed process left."""

    def __init__(self, directory: Path, cfg: CheckpointConfig):
        self.directory = directory
        self._writing: int | None = None  # the step of the save last started
        failures.quiet_orbax_echoes()
        _one_replica_saves_replicated_arrays()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_position: dict, config: Config) -> None:
        """Start saving; returns once the arrays are copied off the device (async).

        `data_position` is the iterator state taken when `state` was: the write may happen
        later, after the iterator has moved on. The state's checksums are computed on the
        device first (one pass over the state) and saved beside it."""
        import grain
        self.wait()  # the previous save's failure is reported as its own
        sums = checksums.compute(state)
        self._writing = step
        with self._reporting_full_disk():
            self.manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_Position(data_position)),
                config=ocp.args.JsonSave(config.to_dict()),
                **{checksums.ITEM: ocp.args.JsonSave(sums)}))

    def saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config

    def restore(self, abstract_state, loader, config: Config, fit=None):
        """(state, step) from the newest readable checkpoint, or None when there is none.
        `fit(abstract_state, saved)`, given the Orbax metadata tree of a checkpoint's state,
        says what to read of it instead of `abstract_state` (what may differ between runs
        and checkpoints: training/histories.py).

        A checkpoint whose arrays differ from the checksums saved with them, or whose files
        are missing or corrupt, is reported in one line, renamed to `<step>.damaged-<time>`
        or `<step>.unreadable-<time>` (kept for inspection) and the next older one is tried.
        Any other failure (out of memory, an I/O error, a program error) is a UserError that
        names it, with every checkpoint left where it is. A checkpoint saved without
        checksums is restored unchecked.
        """
        import grain
        while (step := self.latest_step()) is not None:
            try:
                check_compatible(self.saved_config(step), config, self.directory, step)
                saved_sums = read_checksums(self.directory / str(step))
                target = abstract_state if fit is None else fit(abstract_state,
                                                                 self._saved_tree(step))
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=grain.checkpoint.CheckpointRestore(_PositionTarget(loader))))
                damage = checksums.first_mismatch(saved_sums, restored.state) if saved_sums else None
                if not damage:
                    return restored.state, step
                del restored  # free the damaged state before restoring an older one
                print(f"warning: checkpoint step {step} in {self.directory} is damaged "
                      f"({damage}); moved aside, trying the previous one", file=sys.stderr)
                self._set_aside(step, "damaged")
            except UserError:
                raise
            except Exception as e:  # Orbax/TensorStore raise many types, for many causes
                reason = failures.damage(self.directory / str(step), e)
                if reason is None:
                    raise UserError(
                        f"cannot restore checkpoint step {step} in {self.directory} "
                        f"({type(e).__name__}: {first_line(e)}); nothing shows the checkpoint "
                        "damaged, so every checkpoint is left in place: fix the cause and run "
                        "the same command again") from None
                print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
                      f"({reason}); moved aside, trying the previous one", file=sys.stderr)
                self._set_aside(step, "unreadable")
        return None

    def _saved_tree(self, step: int) -> dict:
        """The metadata (shapes, dtypes) of checkpoint `step`'s state, as a tree."""
        return ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree

    def _set_aside(self, step: int, why: str) -> None:
        from jax.experimental import multihost_utils
        if jax.process_index() == 0:
            path = self.directory / str(step)
            path.rename(path.with_name(f"{step}.{why}-{int(time.time())}"))
        multihost_utils.sync_global_devices(f"pjit_llm set aside checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        with self._reporting_full_disk():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._reporting_full_disk():
            self.manager.close()

    @contextlib.contextmanager
    def _reporting_full_disk(self):
        """A save that ran out of space becomes one line naming it; the step's temporary
        directory is left for the next run's manager to clean up."""
        try:
            yield
        except Exception as e:
            if not out_of_space(e):
                raise
            quiet_teardown()  # the save's other writers fail on the same disk as the run ends
            kept = [s for s in committed_steps(self.directory) if s != self._writing]
            resume = (f"it resumes from step {max(kept)}" if kept else "no checkpoint was "
                      "saved before, so it starts afresh")
            raise UserError(f"no space left on the device writing checkpoint step "
                            f"{self._writing} to {self.directory}; free space there (or set "
                            f"checkpoint.directory to a larger disk) and run the same command "
                            f"again: {resume}") from None


def read_checksums(step_dir: Path) -> dict | None:
    """The checksums saved in a checkpoint step directory; None for one saved without."""
    item = step_dir / checksums.ITEM
    if not item.is_dir():
        return None
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item, args=ocp.args.JsonRestore())


class _Position:
    """A frozen iterator state in the form Grain's checkpoint handler writes (JSON bytes)."""

    def __init__(self, state: dict):
        self._json = json.dumps(_to_json(state)).encode()

    def get_state(self) -> bytes:
        return self._json


class _PositionTarget:
    """Receives the saved bytes from Grain's checkpoint handler and restores the loader."""

    def __init__(self, loader):
        self.loader = loader

    def set_state(self, data: bytes) -> None:
        self.loader.set_state(_from_json(json.loads(data)))

    def start_prefetch(self) -> None:
        pass


# Grain iterator states mix tuples and lists (and may key dicts by integers); plain JSON
# would turn every tuple into a list and the restored iterator would not match. These tags
# keep the types exact.
def _to_json(x):
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    if isinstance(x, dict):
        return {"__items__": [[_to_json(k), _to_json(v)] for k, v in x.items()]}
    return x.item() if hasattr(x, "item") else x


def _from_json(x):
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    if isinstance(x, dict):
        if "__tuple__" in x:
            return tuple(_from_json(v) for v in x["__tuple__"])
        return {_from_json(k): _from_json(v) for k, v in x["__items__"]}
    return x


def check_compatible(saved: dict, config: Config, directory: Path, step: int) -> None:
    """Refuse to resume when a field that fixes shapes or the data stream has changed."""
    current = config.to_dict()
    for section, names in FIXED_FIELDS.items():
        for name in names:
            old, new = saved.get(section, {}).get(name), current[section][name]
            if old != new:
                raise UserError(
                    f"cannot resume from {directory} step {step}: {section}.{name} was {old!r} "
                    f"and is now {new!r}; set it back or use a new train.run_dir")

