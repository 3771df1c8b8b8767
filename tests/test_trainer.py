"""The training loop: exact resume (Ctrl-C mid-epoch, Ctrl-C during validation, max_steps then resume), metrics
file, checkpoints, best, errors, and the schedulers it drives.

Most tests use a tiny toy encoder/decoder (registered here) on tiny synthetic images, so the whole file runs in
seconds; the last tests run the real data pipeline and the real BTTR recipe on ../shared/data/crohme/sample.
"""
from __future__ import annotations

import io
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

import hmerzoo
from hmerzoo import training
from hmerzoo.training import setup as training_setup
from hmerzoo.batch import Batch, pad_images
from hmerzoo.checkpoint import latest_checkpoint, list_checkpoints, load_weights, read_best
from hmerzoo.data.report import DataReport
from hmerzoo.data.sampler import BucketSampler
from hmerzoo.errors import HmerzooError
from hmerzoo.sequence import DecoderOutput, teacher_forcing_tensors
from hmerzoo.optim import MultiStep, Plateau, WarmupCosine
from hmerzoo.registry import DECODERS, ENCODERS

TOKENS = ["a", "b", "c", "d", "e", "f"]


# --- a toy model ----------------------------------------------------------------------------------------------------
class Hooks:
    """Test hooks the toy model calls: send a Ctrl-C at a given training forward or validation batch, or make the
    loss NaN."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.train_forwards = 0
        self.val_batches = 0
        self.sigint_at_forward: int | None = None
        self.sigint_at_val_batch: int | None = None
        self.nan_at_forward: int | None = None


HOOKS = Hooks()


@ENCODERS.register("toy_encoder", override=True)
class ToyEncoder(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel_size=4, stride=4)
        self.out_channels = channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.conv(images)), mask[:, ::4, ::4][:, :images.shape[-2] // 4, :images.shape[-1] // 4]


@DECODERS.register("toy_decoder", override=True)
class ToyDecoder(nn.Module):
    """Context = masked mean of the memory; logits = f(previous token, context), with dropout so that resuming
    must restore the RNG."""

    def __init__(self, in_channels: int, vocab_size: int, pad_id: int | None, sos_id: int, eos_id: int,
                 d_model: int = 16, dropout: float = 0.3):
        super().__init__()
        self.d_model, self.pad_id, self.sos_id, self.eos_id = d_model, pad_id or 0, sos_id, eos_id
        self.context = nn.Linear(in_channels, d_model)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, vocab_size)

    def _context(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = (~mask).unsqueeze(1).float()
        pooled = (memory * valid).sum((2, 3)) / valid.sum((2, 3)).clamp_min(1.0)
        return self.context(pooled)

    def _logits(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(torch.tanh(self.embed(tokens) + context)))

    def forward(self, memory, mask, tokens):
        if self.training:
            HOOKS.train_forwards += 1
            if HOOKS.sigint_at_forward == HOOKS.train_forwards:
                os.kill(os.getpid(), signal.SIGINT)
        inp, tgt = teacher_forcing_tensors(tokens, "l2r", self.sos_id, self.eos_id, self.pad_id, memory.device)
        logits = self._logits(inp, self._context(memory, mask).unsqueeze(1))
        if self.training and HOOKS.nan_at_forward == HOOKS.train_forwards:
            logits = logits * float("nan")
        return DecoderOutput(logits=logits, targets=tgt, directions=["l2r"] * len(tokens))

    def init_state(self, memory, mask, direction="l2r"):
        HOOKS.val_batches += 1
        if HOOKS.sigint_at_val_batch == HOOKS.val_batches:
            os.kill(os.getpid(), signal.SIGINT)
        return self._context(memory, mask)

    def step(self, state, last_tokens):
        return self._logits(last_tokens, state), state

    def reorder_state(self, state, index):
        return state[index]


# --- toy data: the DataBundle interface over synthetic images ---------------------------------------------------
class ToyBuckets(Dataset):
    def __init__(self, num_buckets: int, bucket_size: int, vocab, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.buckets = []
        for b in range(num_buckets):
            images, tokens, names = [], [], []
            for i in range(bucket_size):
                h, w = 16, 16 + 8 * int(torch.randint(0, 3, (1,), generator=g))
                images.append((torch.rand(1, h, w, generator=g) > 0.7).float())
                length = int(torch.randint(1, 5, (1,), generator=g))
                tokens.append(vocab.encode([TOKENS[int(t)] for t in torch.randint(0, len(TOKENS), (length,),
                                                                                    generator=g)]))
                names.append(f"toy_{b}_{i}")
            padded, mask = pad_images(images)
            self.buckets.append(Batch(padded, mask, tokens, names))

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, index: int) -> Batch:
        return self.buckets[index]


class ToyBundle:
    def __init__(self, vocab, seed: int, train_buckets: int = 5, val_buckets: int = 2):
        self.train_sampler = BucketSampler(train_buckets, shuffle=True, seed=seed)
        # No private generator: iter() draws from the global torch RNG, which resume must cope with.
        self.train = DataLoader(ToyBuckets(train_buckets, 2, vocab, seed=1), batch_size=None,
                                sampler=self.train_sampler, collate_fn=lambda b: b)
        self.val = DataLoader(ToyBuckets(val_buckets, 2, vocab, seed=2), batch_size=None,
                              collate_fn=lambda b: b) if val_buckets else None
        self.report = DataReport()
        self.num_train_samples, self.num_val_samples = 2 * train_buckets, 2 * val_buckets


@pytest.fixture
def toy_data(monkeypatch):
    """Replace the trainer's data with the toy bundle (kwargs: train_buckets, val_buckets)."""
    options: dict = {}

    def fake_build_data(recipe, vocab, seed, rank=0, world_size=1):
        return ToyBundle(vocab, seed, **options)

    monkeypatch.setattr(training_setup, "build_data", fake_build_data)
    HOOKS.reset()
    yield options
    HOOKS.reset()


def toy_recipe(tmp_path: Path, run: str, sched: dict | None = None, **train) -> dict:
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text("\n".join(TOKENS) + "\n")
    recipe = {
        "name": "toy", "seed": 3,
        "vocab": {"dictionary": str(dictionary)},
        "data": {"root": str(tmp_path)},
        "model": {"encoder": {"type": "toy_encoder"}, "decoder": {"type": "toy_decoder"}},
        "optim": {"type": "sgd", "lr": 0.5, "momentum": 0.9},
        "train": {"epochs": 3, "log_every": 1, "val_every": 1, "val_max_len": 6, "device": "cpu",
                  "run_dir": str(tmp_path / run), **train},
    }
    if sched is not None:
        recipe["sched"] = sched
    return recipe


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images/s"} for line in lines]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(run_dir).weights)


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    assert ma == mb  # identical per-step losses, grad norms, learning rates and validation results
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


COSINE = {"type": "cosine", "warmup_steps": 3, "min_lr": 0.01}


# --- exact resume -----------------------------------------------------------------------------------------------
def test_ctrl_c_mid_epoch_then_resume_is_exact(tmp_path, toy_data):
    straight = training.train(toy_recipe(tmp_path, "straight", sched=COSINE), console=quiet())
    HOOKS.reset()

    HOOKS.sigint_at_forward = 7  # epoch 2 (5 buckets per epoch), bucket 2
    recipe = toy_recipe(tmp_path, "resumed", sched=COSINE)
    with pytest.raises(KeyboardInterrupt):
        training.train(recipe, console=quiet())
    ckpt = latest_checkpoint(tmp_path / "resumed")
    state = torch.load(ckpt.trainer_state, weights_only=True)
    assert (state["step"], state["epoch"], state["position"]) == (7, 1, 2)  # the step in flight was finished
    HOOKS.reset()
    resumed = training.train(recipe, resume="auto", console=quiet())
    assert resumed == tmp_path / "resumed"
    assert_same_run(straight, resumed)
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == list(range(1, 16))


def test_ctrl_c_during_validation_then_resume_is_exact(tmp_path, toy_data):
    straight = training.train(toy_recipe(tmp_path, "straight", sched=COSINE), console=quiet())
    HOOKS.reset()

    HOOKS.sigint_at_val_batch = 3  # first batch of the second validation
    recipe = toy_recipe(tmp_path, "resumed", sched=COSINE)
    with pytest.raises(KeyboardInterrupt):
        training.train(recipe, console=quiet())
    state = torch.load(latest_checkpoint(tmp_path / "resumed").trainer_state, weights_only=True)
    assert (state["step"], state["epoch"], state["position"]) == (10, 1, 5)  # trained, not yet validated
    HOOKS.reset()
    training.train(recipe, resume="auto", console=quiet())
    assert_same_run(straight, tmp_path / "resumed")


def test_max_steps_then_resume_with_more_steps_is_exact(tmp_path, toy_data):
    # A plateau scheduler that can only improve on its first validation (threshold 100): the second validation
    # must halve the rate - which happens only if its state (the first result) survived the resume.
    plateau = {"type": "plateau", "mode": "min", "monitor": "val/loss", "patience": 0, "factor": 0.5,
               "threshold": 100.0, "threshold_mode": "abs"}
    straight = training.train(toy_recipe(tmp_path, "straight", sched=plateau, max_steps=12, ckpt_every=3),
                                 console=quiet())
    first = training.train(toy_recipe(tmp_path, "resumed", sched=plateau, max_steps=7, ckpt_every=3),
                              console=quiet())
    assert latest_checkpoint(first).step == 7  # max_steps mid-epoch still writes a checkpoint
    training.train(toy_recipe(tmp_path, "resumed", sched=plateau, max_steps=12, ckpt_every=3),
                      resume=str(latest_checkpoint(first).weights), console=quiet())
    assert_same_run(straight, tmp_path / "resumed")
    lrs = {r["step"]: r["lr"] for r in read_metrics(straight) if "lr" in r}
    assert lrs[10] == 0.5 and lrs[11] == 0.25  # reduced after the validation at step 10


# --- what a run leaves behind -----------------------------------------------------------------------------------
def test_run_directory_checkpoints_best_and_metrics(tmp_path, toy_data):
    run_dir = training.train(toy_recipe(tmp_path, "run", ckpt_every=2, keep_last=2, log_every=2),
                                console=quiet())
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "vocab.json").is_file()
    # 15 steps: step checkpoints at 2, 4, 5 (epoch end), 6, ..., 15; only the last two pairs stay.
    assert [c.step for c in list_checkpoints(run_dir)] == [14, 15]
    for ckpt in list_checkpoints(run_dir):
        state = torch.load(ckpt.trainer_state, weights_only=True)
        assert state["step"] == ckpt.step and isinstance(state["rng"]["torch"], torch.Tensor)
    records = read_metrics(run_dir)
    train_lines = [r for r in records if "loss" in r]
    val_lines = [r for r in records if "val/exprate" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 8, 10, 12, 14]
    assert {"step", "epoch", "loss", "loss/ce", "lr", "grad_norm"} <= set(train_lines[0])
    assert [r["step"] for r in val_lines] == [5, 10, 15]
    assert {"val/loss", "val/exprate", "val/le1", "val/le2", "val/le3", "val/count"} <= set(val_lines[0])
    assert val_lines[0]["val/count"] == 4
    best = read_best(run_dir)
    assert best["monitor"] == "val/exprate"
    assert best["value"] == max(r["val/exprate"] for r in val_lines)
    assert best["step"] == next(r["step"] for r in val_lines if r["val/exprate"] == best["value"])
    model = hmerzoo.load_model(run_dir)  # recipe.yaml + vocab.json + best weights
    assert not model.training and model.vocab.tokens[3:] == TOKENS


def test_best_by_min_monitor(tmp_path, toy_data):
    run_dir = training.train(toy_recipe(tmp_path, "run", monitor="val/loss", monitor_mode="min", epochs=2),
                                console=quiet())
    losses = [r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r]
    assert read_best(run_dir)["value"] == pytest.approx(min(losses))


def test_grad_clip_limits_the_update(tmp_path, toy_data):
    run_dir = training.train(toy_recipe(tmp_path, "run", grad_clip=1e-3, max_steps=2, val_every=0),
                                console=quiet())
    records = read_metrics(run_dir)
    assert all(r["grad_norm"] > 1e-3 for r in records)  # the logged norm is the one before clipping


def test_plain_progress_lines_without_a_terminal(tmp_path, toy_data):
    out = io.StringIO()
    training.train(toy_recipe(tmp_path, "run", max_steps=3, val_every=0), console=Console(file=out, width=200))
    text = out.getvalue()
    assert "step 1/3 epoch 1 loss" in text and "ETA" in text and "\x1b[" not in text
    assert "data: no samples left out" in text


def test_progress_bar_on_a_terminal(tmp_path, toy_data):
    out = io.StringIO()
    training.train(toy_recipe(tmp_path, "run", epochs=1), console=Console(file=out, width=200, force_terminal=True))
    text = out.getvalue()
    assert "it/s" in text and "ETA" in text and "lr" in text and "validation epoch 1" in text


def test_fresh_run_refuses_to_overwrite_and_auto_resume_starts_fresh(tmp_path, toy_data):
    recipe = toy_recipe(tmp_path, "run", max_steps=2, val_every=0)
    out = io.StringIO()
    training.train(recipe, resume="auto", console=Console(file=out, width=200))
    assert "no checkpoint" in out.getvalue() and "starting a fresh run" in out.getvalue()
    with pytest.raises(HmerzooError, match="already holds checkpoints.*--resume auto"):
        training.train(recipe, console=quiet())
    # resuming a finished run does nothing more
    training.train(recipe, resume="auto", console=quiet())
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [2]


def test_non_finite_loss_names_step_and_samples(tmp_path, toy_data):
    HOOKS.nan_at_forward = 3
    with pytest.raises(HmerzooError, match=r"step 3: the loss is nan .* toy_\d_0, toy_\d_1"):
        training.train(toy_recipe(tmp_path, "run", val_every=0), console=quiet())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_cuda_requested_without_cuda(tmp_path, toy_data):
    with pytest.raises(HmerzooError, match="CUDA is not available"):
        training.train(toy_recipe(tmp_path, "run", device="cuda"), console=quiet())


def test_bad_train_settings_are_reported_together(tmp_path, toy_data):
    with pytest.raises(HmerzooError) as err:
        training.train(toy_recipe(tmp_path, "run", precision="fp8", monitor="val/acc", log_every=0),
                          console=quiet())
    message = str(err.value)
    assert "train.precision" in message and "train.monitor" in message and "train.log_every" in message


def test_plateau_without_validation_warns(tmp_path, toy_data):
    out = io.StringIO()
    training.train(toy_recipe(tmp_path, "run", sched={"type": "plateau"}, val_every=0, max_steps=2),
                      console=Console(file=out, width=200))
    assert "never validates" in out.getvalue() and "stays constant" in out.getvalue()


def test_threads_and_determinism_are_restored(tmp_path, toy_data):
    threads = torch.get_num_threads()
    training.train(toy_recipe(tmp_path, "run", max_steps=1, val_every=0, num_threads=1, deterministic=True),
                      console=quiet())
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


# --- schedulers ---------------------------------------------------------------------------------------------------
def make_optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def test_plateau_reduces_after_patience_validations():
    opt = make_optimizer(1.0)
    sched = Plateau(opt, monitor="val/exprate", mode="max", factor=0.1, patience=2)
    assert sched.interval == "validation"
    lrs = []
    for value in (0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2):
        sched.step({"val/exprate": value})
        lrs.append(opt.param_groups[0]["lr"])
    # best 0.2 at the 2nd validation; two more without improvement are tolerated, the third reduces
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1])
    with pytest.raises(HmerzooError, match="val/exprate"):
        sched.step({"val/loss": 1.0})


def test_plateau_state_roundtrip():
    opt = make_optimizer(1.0)
    sched = Plateau(opt, mode="min", monitor="val/loss", patience=1)
    sched.step({"val/loss": 1.0})
    sched.step({"val/loss": 2.0})
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    other = Plateau(make_optimizer(1.0), mode="min", monitor="val/loss", patience=1)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.num_bad_validations == 1 and other.inner.best == 1.0


def test_cosine_warmup_then_decay_to_min_lr():
    opt = make_optimizer(1.0)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=4, min_lr=0.1)
    assert sched.interval == "step"
    used = []
    for _ in range(12):
        used.append(opt.param_groups[0]["lr"])  # the rate this optimizer step uses
        sched.step()
    assert used[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up reaches the base rate
    for n in range(5, 11):  # cosine from the base rate (step 4) down to min_lr (step 10)
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (n - 4) / 6))
        assert used[n - 1] == pytest.approx(expected)
    assert used[9] == pytest.approx(0.1) and used[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(used[3:], used[4:]))


def test_cosine_resume_continues_the_schedule():
    opt = make_optimizer(2.0)
    sched = WarmupCosine(opt, total_steps=20, warmup_steps=5)
    for _ in range(7):
        sched.step()
    opt2 = make_optimizer(2.0)
    opt2.load_state_dict(opt.state_dict())
    sched2 = WarmupCosine(opt2, total_steps=20, warmup_steps=5)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert sched2.base_lrs == [2.0]


def test_multistep_by_epoch_or_step():
    opt = make_optimizer(1.0)
    sched = MultiStep(opt, milestones=[2, 4], gamma=0.5)
    assert sched.interval == "epoch"
    lrs = []
    for _ in range(5):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.25])
    assert MultiStep(make_optimizer(), milestones=[1], interval="step").interval == "step"
    with pytest.raises(HmerzooError, match="interval"):
        MultiStep(make_optimizer(), milestones=[1], interval="validation")


def test_schedulers_are_registered_and_validate_in_recipes():
    from hmerzoo.registry import SCHEDULERS

    assert {"plateau", "cosine", "multistep"} <= set(SCHEDULERS.names())
    recipe = hmerzoo.load_recipe("bttr")
    recipe["sched"] = {"type": "cosine", "warmup_steps": 100, "min_lr": 1e-5}
    hmerzoo.validate_recipe(recipe)  # total_steps and optimizer are injected, not required in the recipe


# --- real data, real model ----------------------------------------------------------------------------------------
def test_real_data_pipeline_resume_is_exact(tmp_path, sample_root):
    """The real loaders (bucket sampler with set_start, private worker-seed generator) with the toy model."""
    HOOKS.reset()

    def recipe(run: str) -> dict:
        r = toy_recipe(tmp_path, run, sched=COSINE, epochs=2)
        r["vocab"] = {"dictionary": str(sample_root / "dictionary.txt")}
        r["data"] = {"root": str(sample_root), "val_split": "2014", "val_limit": 4, "train_limit": 12,
                     "batch_size": 4, "num_workers": 0}
        return r

    straight = training.train(recipe("straight"), console=quiet())
    HOOKS.reset()
    HOOKS.sigint_at_forward = 2
    with pytest.raises(KeyboardInterrupt):
        training.train(recipe("resumed"), console=quiet())
    HOOKS.reset()
    training.train(recipe("resumed"), resume="auto", console=quiet())
    assert_same_run(straight, tmp_path / "resumed")


def test_bttr_recipe_trains_validates_and_loads(tmp_path, sample_root):
    recipe = hmerzoo.load_recipe("bttr", [
        f"data.root={sample_root}", "data.val_split='2014'", "data.val_limit=2", "data.max_image_pixels=6000",
        "data.batch_size=2", "data.num_workers=0", "train.epochs=1", "train.val_max_len=4", "train.log_every=1",
        "train.val_every=1", "train.device=cpu", f"train.run_dir={tmp_path / 'bttr'}"])
    run_dir = training.train(recipe, console=quiet())
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # the 6 smallest images, 2 per bucket
    assert any("val/exprate" in r for r in records)
    model = hmerzoo.load_model(run_dir)
    weights = load_weights(latest_checkpoint(run_dir).weights)  # the only validation was at the last step: best
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
