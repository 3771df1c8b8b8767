"""A run survives being killed: SIGKILL at seeded-random moments, ``--resume auto`` each time, and the final weights
are bit-identical to a run that was never interrupted. A checkpoint whose write was killed never replaces the last
complete one.

Everything runs ``python -m hmerzoo`` (or a small script) as a subprocess on CPU, so the kills are real SIGKILLs:
no handler runs, no ``finally`` block, nothing is flushed.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmerzoo.checkpoint import (TEMP_PREFIX, checkpoint_at, checkpoint_dir, latest_checkpoint, list_checkpoints,
                                load_trainer_state, load_weights, resolve_checkpoint, save_checkpoint)
from hmerzoo.errors import CheckpointError

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 20  # 8 buckets per epoch: the run crosses two epoch ends (validation, best checkpoint) mid-way

# A tiny BTTR on the CROHME sample, with dropout, scale augmentation, a per-step cosine schedule, validation
# every epoch and a checkpoint every step - everything that resume must restore exactly.
TINY_RECIPE = """\
extends: bttr
name: tiny
seed: 11
data:
  root: {root}
  batch_size: 8
  max_pixels: 400000
  max_image_pixels: 400000
  num_workers: 0
  scale_aug: true
  val_split: "2014"
  val_limit: 4
model:
  encoder: {{type: densenet, growth_rate: 4, num_layers: 2}}
  neck: {{type: bttr_projection, d_model: 32}}
  decoder: {{type: bttr, d_model: 32, nhead: 2, num_layers: 1, dim_feedforward: 64, dropout: 0.3}}
sched: {{type: cosine, warmup_steps: 3}}
train:
  epochs: 100
  max_steps: {max_steps}
  ckpt_every: 1
  keep_last: 2
  val_every: 1
  val_max_len: 8
  log_every: 1
  device: cpu
  num_threads: 1
"""


def write_recipe(tmp_path: Path, sample_root: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(root=sample_root, max_steps=MAX_STEPS))
    return path


def train_command(recipe: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hmerzoo", "train", str(recipe), f"train.run_dir={run_dir}", *extra]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_stray_processes():
    """A test that fails half-way must not leave its training processes running."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    STARTED.append(proc)
    return proc


def last_logged_step(run_dir: Path) -> int:
    """The highest training step in metrics.jsonl (0 when there is none yet); tolerates a half-written line."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return max(steps)


def train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images/s"} for r in records]


def test_sigkill_at_random_steps_then_resume_auto_is_bit_identical(tmp_path, sample_root):
    recipe = write_recipe(tmp_path, sample_root)
    log = tmp_path / "log.txt"
    straight = tmp_path / "straight"
    assert start(train_command(recipe, straight), log).wait(timeout=120) == 0, log.read_text()

    resumed = tmp_path / "resumed"
    rng = random.Random(20240611)
    # One kill in each third of the run (the second epoch starts at step 11), each at a seeded-random step.
    planned = [rng.randint(2, 6), rng.randint(7, 11), rng.randint(12, 16)]
    for target in planned:
        # Lines past the last checkpoint, left by the killed run, are dropped when the next one starts: only a step
        # beyond them is surely this process's own.
        target = min(max(target, last_logged_step(resumed) + 1), MAX_STEPS - 1)
        proc = start(train_command(recipe, resumed, "--resume", "auto"), log)
        deadline = time.monotonic() + 120
        while last_logged_step(resumed) < target:
            assert proc.poll() is None, f"the run ended before step {target}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"step {target} not reached in time:\n{log.read_text()}"
            time.sleep(0.002)
        # Anywhere in the next step: forward/backward, the metrics line, the checkpoint write, a validation.
        time.sleep(rng.uniform(0.0, 0.2))
        assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        ckpt = latest_checkpoint(resumed)
        assert ckpt is not None and target - 1 <= ckpt.step < MAX_STEPS  # killed mid-run, progress kept

    final = start(train_command(recipe, resumed, "--resume", "auto"), log)
    assert final.wait(timeout=120) == 0, log.read_text()
    assert log.read_text().count("resuming from") == 3  # the first run started fresh

    a, b = latest_checkpoint(straight), latest_checkpoint(resumed)
    assert a.step == b.step == MAX_STEPS
    wa, wb = load_weights(a.weights), load_weights(b.weights)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # The same losses, learning rates, gradient norms and validation results at every step, each logged once.
    assert train_records(straight) == train_records(resumed)
    best_a = load_weights(checkpoint_dir(straight) / "best.safetensors")
    best_b = load_weights(checkpoint_dir(resumed) / "best.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # Nothing the kills left half-written survives the next checkpoint.
    assert [p.name for p in checkpoint_dir(resumed).iterdir() if p.name.startswith(TEMP_PREFIX)] == []
    assert [c.step for c in list_checkpoints(resumed, complete_only=False)] == [MAX_STEPS - 1, MAX_STEPS]


# --- a kill in the middle of a checkpoint write ---------------------------------------------------------------------
SLOW_WRITER = """\
import io, os, sys, time
import safetensors.torch
import torch
from hmerzoo.checkpoint import save_checkpoint

run_dir, phase, marker = sys.argv[1:4]
save_checkpoint(run_dir, 1, {"w": torch.zeros(4)}, {"step": 1})  # the last good pair


def write_slowly(data, path):
    # Half the bytes reach the disk, then the process hangs until it is killed.
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        open(marker, "w").close()
        time.sleep(120)
        f.write(data[len(data) // 2:])


if phase == "weights":
    safetensors.torch.save_file = lambda tensors, path, metadata=None: write_slowly(
        safetensors.torch.save(tensors, metadata=metadata), path)
else:
    real_save = torch.save

    def slow_save(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        write_slowly(buffer.getvalue(), path)

    torch.save = slow_save
big = torch.arange(8_000_000, dtype=torch.float32)  # 32 MB
save_checkpoint(run_dir, 2, {"w": big}, {"step": 2, "big": big}, keep_last=1)
"""


@pytest.mark.parametrize("phase", ["weights", "trainer_state"])
def test_sigkill_during_checkpoint_write_keeps_last_complete_pair(tmp_path, phase):
    script = tmp_path / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), phase, str(marker)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    STARTED.append(proc)
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    good = checkpoint_at(run_dir, 1)
    before = good.weights.read_bytes(), good.trainer_state.read_bytes()
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()

    folder = checkpoint_dir(run_dir)
    leftovers = [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 1_000_000  # the half-written file, under a temp name
    # The half-written step 2 never became a checkpoint: resume finds step 1, byte for byte.
    assert latest_checkpoint(run_dir) == good
    assert resolve_checkpoint(run_dir) == good
    assert (good.weights.read_bytes(), good.trainer_state.read_bytes()) == before
    assert torch.equal(load_weights(good.weights)["w"], torch.zeros(4))
    assert load_trainer_state(good.trainer_state)["step"] == 1
    step2 = checkpoint_at(run_dir, 2)
    assert not step2.trainer_state.exists()
    assert step2.weights.exists() == (phase == "trainer_state")  # the weights come first; alone they do not count
    if phase == "trainer_state":
        with pytest.raises(CheckpointError, match="incomplete"):
            resolve_checkpoint(step2.weights)

    # The next checkpoint cleans up the temp file and the incomplete pair.
    save_checkpoint(run_dir, 3, {"w": torch.ones(4)}, {"step": 3}, keep_last=1)
    assert sorted(p.name for p in folder.iterdir()) == [checkpoint_at(run_dir, 3).weights.name,
                                                         checkpoint_at(run_dir, 3).trainer_state.name]
