"""The directories hmerzoo writes, and checkpoints of a run: atomic writes, complete pairs, keep-last-N, best,
RNG states.

A model directory (the output of ``hmerzoo convert``) holds ``recipe.yaml``, ``vocab.json`` and
``model.safetensors``; a run directory holds ``recipe.yaml``, ``vocab.json`` and, under ``<run_dir>/checkpoints/``::

    step-00001200.safetensors    model weights (state_dict) - written first
    step-00001200.trainer.pt     trainer state - written last: a pair is complete only when this file exists
    best.safetensors, best.json  weights of the best validation result and {monitor, value, step, epoch}

Every file is written to a temporary file in the same folder, flushed to disk and renamed over its final name
(``os.replace`` is atomic on one file system), so an interrupted write never replaces a good file.

The trainer state holds only tensors and primitives (dicts, lists, numbers, strings), so it loads with
``torch.load(path, weights_only=True)``: no pickled code is ever executed on resume.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .errors import CheckpointError

RECIPE_FILE = "recipe.yaml"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "model.safetensors"  # a model directory's weights
CHECKPOINT_DIR = "checkpoints"
WEIGHTS_SUFFIX = ".safetensors"
TRAINER_SUFFIX = ".trainer.pt"
BEST_WEIGHTS = "best.safetensors"
BEST_INFO = "best.json"
STEP_RE = re.compile(r"^step-(\d+)\.safetensors$")
TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Checkpoint:
    """One step's pair of files."""

    step: int
    weights: Path
    trainer_state: Path

    @property
    def complete(self) -> bool:
        return self.weights.is_file() and self.trainer_state.is_file()


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_at(run_dir: str | os.PathLike, step: int) -> Checkpoint:
    """The file names of the checkpoint of ``step`` (whether or not they exist)."""
    stem = checkpoint_dir(run_dir) / f"step-{step:08d}"
    return Checkpoint(step, stem.with_name(stem.name + WEIGHTS_SUFFIX), stem.with_name(stem.name + TRAINER_SUFFIX))


# --- atomic writes ------------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Create ``path`` through ``write(temporary_path)``, then flush it to disk and rename it into place.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content and the temporary file is
    removed (or, after a crash, left as a hidden ``.tmp-*`` file that :func:`prune_checkpoints` cleans up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh hidden name in the same folder (os.replace cannot cross file systems); created by ``write`` itself,
    # so the file gets the usual permissions (mkstemp would make it private).
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- weights ----------------------------------------------------------------------------------------------------
def weights_for_saving(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage: what safetensors accepts.

    Tensors that share memory (tied weights) are cloned, so every state_dict key is stored and loading stays
    strict.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_weights(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = weights_for_saving(state_dict)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types on truncated or corrupt files
        raise CheckpointError(f"{path}: cannot read the weights ({e})") from None


def find_weights(path: Path) -> Path:
    """The weights file a model directory or run directory stands for: model.safetensors, else the best weights,
    else the newest step's (a weights file stands for itself)."""
    if path.is_file():
        return path
    for cand in (path / WEIGHTS_FILE, checkpoint_dir(path) / BEST_WEIGHTS):
        if cand.is_file():
            return cand
    steps = list_checkpoints(path, complete_only=False)  # an evaluation needs no trainer state
    if steps:
        return steps[-1].weights
    raise CheckpointError(f"{path}: no weights found (looked for {WEIGHTS_FILE}, {CHECKPOINT_DIR}/{BEST_WEIGHTS}, "
                          f"{CHECKPOINT_DIR}/step-*{WEIGHTS_SUFFIX}); is this a run directory or the output of "
                          "'hmerzoo convert'?")


def find_model_dir(path: Path) -> Path:
    """The directory holding recipe.yaml for a model directory, run directory or weights file inside one."""
    for d in [path] + list(path.parents)[:3]:
        if (d / RECIPE_FILE).is_file():
            return d
    raise CheckpointError(f"{path}: no {RECIPE_FILE} here or in the folders above; load_model takes a run "
                          "directory or the output directory of 'hmerzoo convert'")


# --- trainer state ----------------------------------------------------------------------------------------------
def save_trainer_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state, read with ``weights_only=True`` (tensors and primitives only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such trainer state file") from None
    except pickle.UnpicklingError as e:
        # Never retried with weights_only=False: unpickling arbitrary objects runs code from the file.
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load it: the file holds pickled Python objects (it asks to import "
                f"{refused.group(1)}), and unpickling them could run code from the file. hmerzoo writes trainer "
                "states of tensors and plain values only, so this file was not written by hmerzoo (or was altered); "
                "resume from a checkpoint hmerzoo wrote, or start a fresh run") from None
        raise CheckpointError(f"{path}: cannot read the trainer state (damaged, or not a file hmerzoo wrote: "
                              f"{_unpickler_reason(e)}); {DAMAGED_HINT}") from None
    except Exception as e:
        # torch's own text (e.g. a file cut short) is one long paragraph; its first sentence says what is wrong
        reason = str(e).strip().split(". ")[0]
        raise CheckpointError(f"{path}: cannot read the trainer state ({type(e).__name__}: {reason}); "
                              f"{DAMAGED_HINT}") from None


DAMAGED_HINT = ("resume from another checkpoint (--resume checkpoints/step-XXXXXXXX.trainer.pt), or move this "
                "step's two files away so --resume auto takes the previous one")


def _unpickler_reason(error: Exception) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(error), flags=re.DOTALL)
    return match.group(1).strip() if match else str(error).strip().splitlines()[0]


def capture_rng_state() -> dict[str, Any]:
    """The states of every random generator training uses, as tensors and primitives.

    Python's and numpy's states are tuples holding a numpy array; they are turned into lists and tensors so the
    trainer state stays loadable with ``weights_only=True``.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda_states = list(state.get("cuda") or [])
    if cuda_states and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the generators it has; extra saved states are ignored.
        for index, cuda_state in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))


# --- checkpoints of a run -----------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: Mapping[str, torch.Tensor],
                    trainer_state: Mapping[str, Any], keep_last: int = 0) -> Checkpoint:
    """Write the pair of ``step`` (weights first, trainer state last), then keep the newest ``keep_last``
    complete pairs (0 keeps all)."""
    ckpt = checkpoint_at(run_dir, step)
    # Saving a step again (the trainer never does) first turns its old pair incomplete, so a crash between the two
    # writes cannot leave new weights paired with an old trainer state.
    ckpt.trainer_state.unlink(missing_ok=True)
    save_weights(ckpt.weights, model_state, metadata={"step": step})
    save_trainer_state(ckpt.trainer_state, trainer_state)
    prune_checkpoints(run_dir, keep_last)
    return ckpt


def list_checkpoints(run_dir: str | os.PathLike, complete_only: bool = True) -> list[Checkpoint]:
    """Step checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STEP_RE.match(path.name)
        if match:
            ckpt = checkpoint_at(run_dir, int(match.group(1)))
            if ckpt.complete or not complete_only:
                found.append(ckpt)
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest complete pair of a run directory, or None."""
    complete = list_checkpoints(run_dir)
    return complete[-1] if complete else None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete pairs (0 keeps all), incomplete pairs older than the
    newest complete one (left by a crash mid-write), and stale temporary files."""
    folder = checkpoint_dir(run_dir)
    complete = list_checkpoints(run_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    if complete:
        newest = complete[-1].step
        doomed += [c for c in list_checkpoints(run_dir, complete_only=False) if not c.complete and c.step < newest]
    for ckpt in doomed:
        # The trainer state goes first: a half-deleted pair then reads as incomplete, never as resumable.
        ckpt.trainer_state.unlink(missing_ok=True)
        ckpt.weights.unlink(missing_ok=True)
    # Left by a crash mid-write. Only one process writes a run's checkpoints, and it is not writing now.
    for tmp in folder.glob(f"{TEMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)


def resolve_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint named by a run directory (its latest), a step's weights or trainer file, or its stem."""
    p = Path(path)
    if p.is_dir():
        run_dir = p.parent if p.name == CHECKPOINT_DIR else p
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"{p}: no complete checkpoint (step-*.safetensors + step-*.trainer.pt) in "
                                  f"{checkpoint_dir(run_dir)}")
        return ckpt
    name = p.name
    for suffix in (TRAINER_SUFFIX, WEIGHTS_SUFFIX):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    match = re.match(r"^step-(\d+)$", name)
    if not match:
        raise CheckpointError(f"{p}: not a step checkpoint; resume takes a run directory or a "
                              "checkpoints/step-XXXXXXXX.safetensors / .trainer.pt file (best.safetensors has "
                              "no trainer state)")
    step = int(match.group(1))
    ckpt = Checkpoint(step, p.with_name(name + WEIGHTS_SUFFIX), p.with_name(name + TRAINER_SUFFIX))
    if not ckpt.complete:
        missing = [str(f) for f in (ckpt.weights, ckpt.trainer_state) if not f.is_file()]
        raise CheckpointError(f"{p}: checkpoint of step {step} is incomplete; missing {', '.join(missing)}")
    return ckpt


# --- best ---------------------------------------------------------------------------------------------------------
def save_best(run_dir: str | os.PathLike, model_state: Mapping[str, torch.Tensor], monitor: str, value: float,
              step: int, epoch: int) -> None:
    """Replace the best weights and their record (weights first; the trainer state keeps the authoritative
    best value, so a crash between the two files is repaired when training reaches this step again)."""
    folder = checkpoint_dir(run_dir)
    save_weights(folder / BEST_WEIGHTS, model_state, metadata={"step": step, "monitor": monitor, "value": value})
    info = {"monitor": monitor, "value": value, "step": step, "epoch": epoch}
    atomic_write_text(folder / BEST_INFO, json.dumps(info, indent=1) + "\n")


def read_best(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = checkpoint_dir(run_dir) / BEST_INFO
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
