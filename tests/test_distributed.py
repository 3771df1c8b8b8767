"""Training on several processes (torchrun + DDP, gloo on CPU).

What "the same as one process" means here: DDP with W ranks takes, at step k of an epoch, the buckets at positions
kW, kW+1, ..., kW+W-1 of the epoch's bucket order (which depends on the seed and the epoch only), one bucket per
rank, and averages the ranks' gradients. The one-process reference below does exactly that in a single process:
it builds the same model (same seed) and the same data (world size 1), and at step k computes the loss of each of
those W buckets, backpropagates their mean and takes one optimizer step. The two agree (up to float rounding) by
construction, so the test checks the plumbing: sharding, gradient averaging, the mean-over-ranks logged loss, the
sharded-then-summed validation and the checkpoint rank 0 writes.

It is *not* the same as one process training on buckets of W times the batch size: the cross-entropy is a mean
over the tokens of a bucket, and the mean of W per-bucket token means differs from the token mean of their union
when the buckets hold different numbers of tokens. The model has no dropout in the comparison (dropout draws from
per-rank generator streams, seeded with seed + rank). BatchNorm normalises with each bucket's own statistics in
both runs; its running statistics (used by validation) follow rank 0's buckets under DDP, which broadcasts rank 0's
buffers at every forward, and the reference keeps rank 0's too. Both run single-threaded.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import hmerzoo
from hmerzoo import cli
from hmerzoo.builder import build_component, build_model
from hmerzoo.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state, load_weights
from hmerzoo.data import BucketSampler
from hmerzoo.data.loaders import collate_bucket
from hmerzoo.distributed import ENV_RELAUNCHED, strip_nproc_flag, torchrun_argv
from hmerzoo.errors import CheckpointError
from hmerzoo.registry import OPTIMIZERS
from hmerzoo.runtime import seed_everything
from hmerzoo.training import build_data, greedy_validation
from hmerzoo.training import train as train_run

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def tiny_overrides(sample_root: Path, run_dir: Path, dropout: float = 0.0, **train) -> list[str]:
    """The BTTR recipe shrunk: 8 training samples in buckets of 2 (4 buckets: 2 steps per epoch on 2 ranks),
    6 validation samples (3 buckets: 2 on rank 0, 1 on rank 1), no scheduler; ``dropout`` in encoder and decoder."""
    settings = {"epochs": 2, "max_steps": 3, "log_every": 1, "val_every": 1, "val_max_len": 4, "device": "cpu",
                "num_threads": 1, **train}
    return [f"data.root={sample_root}", "data.num_workers=0", "data.batch_size=2", "data.train_limit=8",
            "data.val_split='2014'", "data.val_limit=6",
            "model.encoder.growth_rate=4", "model.encoder.num_layers=2", f"model.encoder.dropout={dropout}",
            "model.neck.d_model=32",
            "model.decoder.d_model=32", "model.decoder.nhead=2", "model.decoder.num_layers=1",
            "model.decoder.dim_feedforward=64", f"model.decoder.dropout={dropout}", "~sched",
            *(f"train.{k}={v}" for k, v in settings.items()), f"train.run_dir={run_dir}"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reference_run(recipe: dict, steps: int, world: int) -> tuple[torch.nn.Module, list[dict], list[dict]]:
    """One process doing what DDP over ``world`` ranks does: per step, the mean loss of the next ``world`` buckets
    of the epoch order (wrapping at the end of the epoch), one optimizer step; validation at the end of an epoch.

    Run with one thread, like the workers (train.num_threads=1): this tiny model's gradients move by ~1e-4 with
    the thread count (BatchNorm over buckets of 2 small images), more than the tolerance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(recipe["train"]["num_threads"]))
    try:
        return _reference_run(recipe, steps, world)
    finally:
        torch.set_num_threads(threads)


def _reference_run(recipe: dict, steps: int, world: int) -> tuple[torch.nn.Module, list[dict], list[dict]]:
    seed = int(recipe["seed"])
    seed_everything(seed)
    model = build_model(recipe)
    data = build_data(recipe, model.vocab, seed)  # world size 1: every bucket, the epoch order of any world size
    sampler, buckets = data.train_sampler, data.train.dataset
    per_epoch = -(-len(sampler) // world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_component(OPTIMIZERS, recipe["optim"], "optim", {"params": params})
    train_records, val_records = [], []
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        order = sampler.epoch_order(epoch)
        picks = [order[(k * world + r) % len(order)] for r in range(world)]
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for r, b in enumerate(picks):
            losses.append(model(collate_bucket([buckets[(epoch, b)]]))["loss"])
            if r == 0:  # DDP broadcasts rank 0's buffers at each forward: BatchNorm statistics follow its buckets
                rank0_buffers = {n: t.clone() for n, t in model.named_buffers()}
        loss = sum(losses) / world
        loss.backward()
        with torch.no_grad():  # after backward, which saved the buffers' versions
            for n, t in model.named_buffers():
                t.copy_(rank0_buffers[n])
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
        optimizer.step()
        train_records.append({"step": step + 1, "loss": loss.item(), "grad_norm": norm.item()})
        if k + 1 == per_epoch:
            val_records.append({"step": step + 1, **greedy_validation(model, iter(data.val), torch.device("cpu"), "fp32",
                                                             int(recipe["train"]["val_max_len"]))})
    return model, train_records, val_records


# --- the sampler: the same epoch for any world size ----------------------------------------------------------------
@pytest.mark.parametrize("num_buckets", [1, 5, 8, 11])
def test_bucket_sampler_shards_the_same_epoch_for_any_world_size(num_buckets):
    for epoch in range(3):
        order = BucketSampler(num_buckets, seed=5).epoch_order(epoch)
        assert sorted(order) == list(range(num_buckets))
        for world in (2, 3, 4):
            shards = [BucketSampler(num_buckets, seed=5, rank=r, world_size=world).epoch_order(epoch)
                      for r in range(world)]
            per_rank = -(-num_buckets // world)
            assert all(len(s) == per_rank for s in shards)
            # Step k takes positions kW .. kW+W-1 of the one-process order, wrapping around at its end.
            interleaved = [shards[r][k] for k in range(per_rank) for r in range(world)]
            assert interleaved == [order[i % num_buckets] for i in range(per_rank * world)]
    assert BucketSampler(8, seed=5).epoch_order(0) != BucketSampler(8, seed=5).epoch_order(1)


# --- the command line -------------------------------------------------------------------------------------------
def test_nproc_flag_is_stripped_for_the_relaunch():
    argv = ["--debug", "train", "bttr", "a.b=1", "--nproc-per-node", "2", "--resume", "auto"]
    assert strip_nproc_flag(argv) == ["--debug", "train", "bttr", "a.b=1", "--resume", "auto"]
    assert strip_nproc_flag(["train", "x", "--nproc-per-node=4", "--nproc_per_node", "3", "--nproc", "2"]) == \
        ["train", "x"]
    assert torchrun_argv(2, ["train", "x"]) == ["--standalone", "--nproc-per-node", "2", "-m", "hmerzoo", "train",
                                                "x"]


def test_cli_relaunches_through_torch_distributed_run(monkeypatch, sample_root, tmp_path):
    import torch.distributed.run

    calls = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda args: calls.append((args, dict(os.environ))))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    overrides = tiny_overrides(sample_root, tmp_path / "run")
    assert cli.main(["train", "bttr", *overrides, "--nproc-per-node", "2"]) == 0
    (args, env), = calls
    assert args == ["--standalone", "--nproc-per-node", "2", "-m", "hmerzoo", "train", "bttr", *overrides]
    assert env.get(ENV_RELAUNCHED) == "1"  # the workers train instead of relaunching
    assert not (tmp_path / "run").exists()  # the parent only validated the recipe

    # Inside a torchrun job the flag is a mistake.
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(["train", "bttr", *overrides, "--nproc-per-node", "2"]) == 2
    assert len(calls) == 1


# --- 2 processes == 1 process averaging the same buckets ---------------------------------------------------------
def test_two_processes_through_the_cli_match_one_process(sample_root, tmp_path):
    """``hmerzoo train ... --nproc-per-node 2`` end to end (torch.distributed.run, gloo, DDP), against the
    one-process reference: per-step losses and gradient norms, validation, final parameters."""
    run_dir = tmp_path / "ddp"
    overrides = tiny_overrides(sample_root, run_dir)
    done = subprocess.run([sys.executable, "-m", "hmerzoo", "train", "bttr", *overrides, "--nproc-per-node",
                           str(WORLD)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("done: step 3") == 1  # rank 0 alone prints

    recipe = hmerzoo.load_recipe("bttr", overrides)
    model, train_ref, val_ref = reference_run(recipe, steps=3, world=WORLD)
    records = read_metrics(run_dir)
    train_log = [r for r in records if "loss" in r]
    val_log = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in train_log] == [1, 2, 3]
    for got, want in zip(train_log, train_ref):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), (got, want)  # the mean over the ranks
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5, abs=1e-6), (got, want)
    assert train_log[0]["loss"] != train_log[2]["loss"]
    # Validation: each rank decodes its buckets, the sums are all-reduced: every sample counted once.
    (got_val,), (want_val,) = val_log, val_ref
    assert got_val["step"] == want_val["step"] == 2
    assert got_val["val/count"] == want_val["val/count"] == 6
    assert got_val["val/loss"] == pytest.approx(want_val["val/loss"], abs=1e-5)
    for key in ("val/exprate", "val/le1", "val/le2", "val/le3"):
        assert got_val[key] == want_val[key]

    ckpt = latest_checkpoint(run_dir)
    assert ckpt.step == 3
    weights = load_weights(ckpt.weights)
    assert weights.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():  # parameters and BatchNorm statistics
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    state = load_trainer_state(ckpt.trainer_state)
    assert state["world_size"] == WORLD and len(state["rng_ranks"]) == WORLD

    # A checkpoint of a 2-process run does not resume in 1 process (its epochs are sharded in two).
    with pytest.raises(CheckpointError, match="2 process"):
        train_run(hmerzoo.load_recipe("bttr", tiny_overrides(sample_root, run_dir, max_steps=4)), resume="auto",
                  console=Console(file=io.StringIO()))


# --- resume with DDP: each rank's generators ---------------------------------------------------------------------
def _resume_worker(rank: int, world: int, store: str, recipes: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:  # train() joins the existing process group (and leaves it to us)
        quiet = Console(file=io.StringIO())
        train_run(recipes["straight"], console=quiet)
        train_run(recipes["part"], console=quiet)
        train_run(recipes["rest"], resume="auto", console=quiet)
        # train.max_time: only rank 1's clock moves (10 s per optimizer step), so only rank 1 is past the 15 s budget
        # after step 2; rank 0 must stop after that same step too, or the next step's collectives would hang.
        from hmerzoo.training import loop, stopping

        steps = [0]
        real_step = loop.train_step

        def counting_step(*args, **kwargs):
            steps[0] += 1
            return real_step(*args, **kwargs)

        loop.train_step = counting_step
        stopping.now = lambda: 10.0 * steps[0] if rank == 1 else 0.0
        train_run(recipes["timed"], console=quiet)
        loop.train_step, stopping.now = real_step, lambda: 0.0
        train_run(recipes["timed_rest"], resume="auto", console=quiet)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's background threads can abort a spawned child at exit
    # ("terminate called without an active exception") after all its work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_resume_with_two_processes_is_exact(sample_root, tmp_path):
    """Dropout on: each rank's generator stream is saved (gathered into the checkpoint) and restored, so 1 step,
    then a resume to step 3 (across an epoch end and a validation) equals 3 steps straight."""
    import torch.multiprocessing as mp

    recipes = {
        "straight": hmerzoo.load_recipe("bttr", tiny_overrides(sample_root, tmp_path / "straight", dropout=0.3)),
        "part": hmerzoo.load_recipe("bttr", tiny_overrides(sample_root, tmp_path / "resumed", dropout=0.3,
                                                           max_steps=1)),
        "rest": hmerzoo.load_recipe("bttr", tiny_overrides(sample_root, tmp_path / "resumed", dropout=0.3)),
        "timed": hmerzoo.load_recipe("bttr", tiny_overrides(sample_root, tmp_path / "timed", dropout=0.3,
                                                            max_time="15s")),
        "timed_rest": hmerzoo.load_recipe("bttr", tiny_overrides(sample_root, tmp_path / "timed", dropout=0.3)),
    }
    mp.spawn(_resume_worker, args=(WORLD, str(tmp_path / "store"), recipes), nprocs=WORLD, join=True)

    def without_speed(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images/s"} for r in read_metrics(run_dir)]

    straight, resumed = without_speed(tmp_path / "straight"), without_speed(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [1, 2, 2, 3]
    assert straight == resumed
    # the max_time stop: both ranks stopped after step 2 (rank 0 wrote its checkpoint), and the resume is exact
    assert [c.step for c in list_checkpoints(tmp_path / "timed")] == [2, 3]
    assert without_speed(tmp_path / "timed") == straight
    a, b = load_weights(latest_checkpoint(tmp_path / "straight").weights), \
        load_weights(latest_checkpoint(tmp_path / "resumed").weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rng = load_trainer_state(latest_checkpoint(tmp_path / "straight").trainer_state)["rng_ranks"]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])  # seed + rank: different dropout streams
