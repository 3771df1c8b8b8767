"""Options of the training loop (issue 6): EMA of the weights, gradient accumulation, torch.compile and
deterministic mode, each on CPU with the toy model and toy data of test_trainer.py (a tiny BTTR for compile)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import hmerzoo
from hmerzoo import training
from hmerzoo.training import greedy_validation
from hmerzoo.training import loop as training_loop
from hmerzoo.batch import Batch, pad_images
from hmerzoo.checkpoint import latest_checkpoint, list_checkpoints, load_weights, read_best
from hmerzoo.errors import HmerzooError
from hmerzoo.registry import ENCODERS
from test_trainer import (COSINE, HOOKS, TOKENS, ToyBundle, assert_same_run, final_weights, quiet,  # noqa: F401
                          read_metrics, toy_data, toy_recipe)


@ENCODERS.register("toy_bn_encoder", override=True)
class ToyBNEncoder(nn.Module):
    """The toy encoder with a BatchNorm: buffers that change in training (running statistics)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, kernel_size=4, stride=4)
        self.norm = nn.BatchNorm2d(channels)
        self.out_channels = channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = images.shape[-2] // 4, images.shape[-1] // 4
        return torch.relu(self.norm(self.conv(images))), mask[:, ::4, ::4][:, :h, :w]


def bn_recipe(tmp_path, run: str, **train) -> dict:
    recipe = toy_recipe(tmp_path, run, **train)
    recipe["model"]["encoder"] = {"type": "toy_bn_encoder"}
    return recipe


def trainer_state(ckpt) -> dict:
    return torch.load(ckpt.trainer_state, weights_only=True)


# --- EMA of the weights -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start,every", [(0, 1), (1, 2)])
def test_ema_weights_are_the_ema_of_the_raw_weights(tmp_path, toy_data, start, every):
    """Every step's checkpoint: the trainer state holds the raw weights w_s, the weights file the EMA, which must be
    e = w_s at the first update (step s > start with s % every == 0), then e = d e + (1 - d) w_s at each update -
    for the parameters and the BatchNorm running statistics alike (use_buffers=True)."""
    decay = 0.8
    run_dir = training.train(bn_recipe(tmp_path, "run", ema_decay=decay, ema_start=start, ema_every=every,
                                          max_steps=7, val_every=0, ckpt_every=1, keep_last=0), console=quiet())
    ckpts = list_checkpoints(run_dir)
    assert [c.step for c in ckpts] == list(range(1, 8))
    ema: dict[str, torch.Tensor] | None = None
    previous_raw = None
    for ckpt in ckpts:
        state = trainer_state(ckpt)
        raw = state["ema"]["raw_model"]
        if ckpt.step > start and ckpt.step % every == 0:
            ema = {k: v.clone() for k, v in raw.items()} if ema is None else \
                {k: decay * e + (1 - decay) * raw[k] if e.is_floating_point() else e for k, e in ema.items()}
        saved = load_weights(ckpt.weights)
        expected = ema if ema is not None else raw  # before its first update the raw model stands in
        assert state["ema"]["n_averaged"] == (0 if ema is None else sum(
            1 for s in range(1, ckpt.step + 1) if s > start and s % every == 0))
        for key, value in expected.items():
            if value.is_floating_point():
                torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=f"step {ckpt.step} {key}")
        if previous_raw is not None:  # the raw weights train on: they change every step
            assert not torch.equal(raw["encoder.conv.weight"], previous_raw)
        previous_raw = raw["encoder.conv.weight"]
    assert "encoder.norm.running_mean" in ema  # buffers averaged as well
    assert not torch.equal(ema["encoder.norm.running_mean"], raw["encoder.norm.running_mean"])


def test_ema_is_validated_saved_as_best_and_loaded(tmp_path, toy_data):
    run_dir = training.train(bn_recipe(tmp_path, "run", ema_decay=0.5, ema_val_raw=True, epochs=2),
                                console=quiet())
    val = [r for r in read_metrics(run_dir) if "val/loss" in r]
    assert [r["step"] for r in val] == [5, 10]
    assert all("val_raw/loss" in r and "val_raw/exprate" in r for r in val)
    assert val[-1]["val/loss"] != val[-1]["val_raw/loss"]
    # val/* are the EMA weights' (those in the step-10 weights file); val_raw/* the trained weights'
    last = latest_checkpoint(run_dir)
    model = hmerzoo.load_model(run_dir, weights=str(last.weights))
    raw = copy.deepcopy(model)
    raw.load_state_dict(trainer_state(last)["ema"]["raw_model"])
    bundle = ToyBundle(model.vocab, seed=3)
    ema_results = greedy_validation(model, iter(bundle.val), torch.device("cpu"), "fp32", max_len=6)
    raw_results = greedy_validation(raw, iter(bundle.val), torch.device("cpu"), "fp32", max_len=6)
    assert ema_results["val/loss"] == pytest.approx(val[-1]["val/loss"], rel=1e-6)
    assert raw_results["val/loss"] == pytest.approx(val[-1]["val_raw/loss"], rel=1e-6)
    # best.safetensors = the EMA weights of the best validation; load_model(run_dir) gives them
    best = read_best(run_dir)
    best_weights = load_weights(run_dir / "checkpoints" / "best.safetensors")
    loaded = hmerzoo.load_model(run_dir).state_dict()
    assert all(torch.equal(loaded[k], best_weights[k]) for k in loaded)
    if best["step"] == 10:
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in best_weights.items())


def test_ema_resume_is_exact(tmp_path, toy_data):
    straight = training.train(bn_recipe(tmp_path, "straight", sched=COSINE, ema_decay=0.7, ema_every=2),
                                 console=quiet())
    HOOKS.reset()
    HOOKS.sigint_at_forward = 7  # epoch 2, bucket 2: n_averaged 3 in the checkpoint
    recipe = bn_recipe(tmp_path, "resumed", sched=COSINE, ema_decay=0.7, ema_every=2)
    with pytest.raises(KeyboardInterrupt):
        training.train(recipe, console=quiet())
    state = trainer_state(latest_checkpoint(tmp_path / "resumed"))
    assert (state["step"], state["ema"]["n_averaged"]) == (7, 3)
    HOOKS.reset()
    training.train(recipe, resume="auto", console=quiet())
    assert_same_run(straight, tmp_path / "resumed")  # metrics (validation of the EMA) and EMA weights
    raw_a = trainer_state(latest_checkpoint(straight))["ema"]["raw_model"]
    raw_b = trainer_state(latest_checkpoint(tmp_path / "resumed"))["ema"]["raw_model"]
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)


# --- gradient accumulation ----------------------------------------------------------------------------------------
def fixed_batch(vocab, names: list[str], seed: int, length: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = [(torch.rand(1, 16, 24, generator=g) > 0.6).float() for _ in names]
    tokens = [vocab.encode([TOKENS[int(t)] for t in torch.randint(0, len(TOKENS), (length,), generator=g)])
              for _ in names]
    padded, mask = pad_images(images)
    return Batch(padded, mask, tokens, names)


def test_accumulate_two_buckets_equals_one_step_on_their_union(tmp_path):
    """What is compared: the weights (and gradients) after one SGD-with-momentum step from the same start, on
    buckets A and B with accumulate=2 versus on the batch A+B. Exact by construction: every image is 16x24 (no
    padding differences), every caption has 3 tokens (so the token-mean CE of A+B is the mean of A's and B's token
    means), and the model is in eval mode (dropout off; BatchNorm on its running statistics, which treat each
    sample alone - batch statistics would differ between A, B and A+B)."""
    recipe = bn_recipe(tmp_path, "unused")
    recipe["model"]["decoder"] = {"type": "toy_decoder", "dropout": 0.0}
    torch.manual_seed(0)
    model = hmerzoo.build_model(recipe)
    with torch.no_grad():  # running statistics that are not the identity
        model.encoder.norm.running_mean.uniform_(-0.5, 0.5)
        model.encoder.norm.running_var.uniform_(0.5, 2.0)
    other = copy.deepcopy(model)
    a = fixed_batch(model.vocab, ["a0", "a1"], seed=1)
    b = fixed_batch(model.vocab, ["b0", "b1"], seed=2)
    union = Batch(torch.cat((a.images, b.images)), torch.cat((a.image_mask, b.image_mask)), a.tokens + b.tokens,
                  a.names + b.names)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for m, batches in ((model, [a, b]), (other, union)):
        m.eval()
        params = [p for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
        results.append(training.train_step(m, batches, optimizer, params, torch.device("cpu"), "fp32"))
    assert results[0].loss == pytest.approx(results[1].loss, abs=1e-6)  # the mean of A's and B's losses
    assert results[0].grad_norm == pytest.approx(results[1].grad_norm, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert not torch.equal(p, start[name]), name  # the step changed it
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


def test_accumulate_counts_optimizer_steps_and_resumes_exactly(tmp_path, toy_data):
    # 5 buckets per epoch, 2 per step: steps of 2, 2 and 1 buckets, 3 steps per epoch, 6 in all
    out = io.StringIO()
    straight = training.train(toy_recipe(tmp_path, "straight", sched=COSINE, epochs=2, accumulate=2, ckpt_every=1,
                                            keep_last=0), console=Console(file=out, width=200))
    assert "3 steps per epoch of 2 buckets, 6 steps in all" in out.getvalue()
    records = read_metrics(straight)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val/loss" in r] == [3, 6]
    positions = [(c.step, trainer_state(c)["position"]) for c in list_checkpoints(straight)]
    assert positions == [(1, 2), (2, 4), (3, 0), (4, 2), (5, 4), (6, 0)]  # optimizer-step boundaries only
    assert HOOKS.train_forwards == 10  # every bucket trained on once

    HOOKS.reset()
    HOOKS.sigint_at_forward = 3  # first bucket of step 2: its second bucket is still trained, then the stop
    recipe = toy_recipe(tmp_path, "resumed", sched=COSINE, epochs=2, accumulate=2, ckpt_every=1, keep_last=0)
    with pytest.raises(KeyboardInterrupt):
        training.train(recipe, console=quiet())
    state = trainer_state(latest_checkpoint(tmp_path / "resumed"))
    assert (state["step"], state["epoch"], state["position"], state["accumulate"]) == (2, 0, 4, 2)
    HOOKS.reset()
    training.train(recipe, resume="auto", console=quiet())
    assert_same_run(straight, tmp_path / "resumed")


def test_accumulate_one_is_the_plain_loop(tmp_path, toy_data):
    a = training.train(toy_recipe(tmp_path, "a", max_steps=4, val_every=0), console=quiet())
    HOOKS.reset()
    b = training.train(toy_recipe(tmp_path, "b", max_steps=4, val_every=0, accumulate=1), console=quiet())
    assert_same_run(a, b)


# --- torch.compile ------------------------------------------------------------------------------------------------
TINY_BTTR = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.neck.d_model=32",
             "model.decoder.d_model=32", "model.decoder.nhead=4", "model.decoder.num_layers=2",
             "model.decoder.dim_feedforward=64"]


def test_compiled_encoder_and_decoder_layers_match_eager(tmp_path):
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text("\n".join(TOKENS) + "\n")
    torch.manual_seed(0)
    eager = hmerzoo.build_model("bttr", [f"vocab.dictionary={dictionary}", *TINY_BTTR]).eval()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    targets = training.compile_model(compiled, backend="aot_eager")
    assert targets[:2] == [compiled.encoder, compiled.neck]
    assert targets[2:] == list(compiled.decoder.layers)  # the layers; not the decoder, its embedding or projection
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes
    batch = fixed_batch(eager.vocab, ["x0", "x1", "x2"], seed=5)
    with torch.no_grad():
        memory, mask = compiled.encode(batch.images, batch.image_mask)
        memory_ref, mask_ref = eager.encode(batch.images, batch.image_mask)
        loss, loss_ref = compiled(batch)["loss"], eager(batch)["loss"]
    torch.testing.assert_close(memory, memory_ref, rtol=0, atol=1e-4)
    assert torch.equal(mask, mask_ref)
    assert float(loss) == pytest.approx(float(loss_ref), abs=1e-4)


def test_compiled_training_run_matches_eager_and_saves_plain_weights(tmp_path, toy_data):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    eager = training.train(toy_recipe(tmp_path, "eager", epochs=1), console=quiet())
    assert counters["stats"]["unique_graphs"] == graphs
    HOOKS.reset()
    compiled = training.train(toy_recipe(tmp_path, "compiled", epochs=1, compile=True,
                                            compile_backend="aot_eager"), console=quiet())
    assert counters["stats"]["unique_graphs"] > graphs  # the toy encoder (the toy decoder has no layers to compile)
    a, b = read_metrics(eager), read_metrics(compiled)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val/loss", "val/exprate"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-4), (ra["step"], key)
    weights = final_weights(compiled)
    assert not any("_orig_mod" in k for k in weights)
    model = hmerzoo.load_model(compiled)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for k, v in final_weights(eager).items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-4)


# --- deterministic mode, settings ---------------------------------------------------------------------------------
def test_deterministic_runs_are_bit_identical(tmp_path, toy_data):
    a = training.train(bn_recipe(tmp_path, "a", epochs=2, deterministic=True), console=quiet())
    HOOKS.reset()
    b = training.train(bn_recipe(tmp_path, "b", epochs=2, deterministic=True), console=quiet())
    assert_same_run(a, b)  # the same metrics and bit-identical weights


@pytest.mark.parametrize("before", [None, False, True])
def test_deterministic_flag_holds_during_the_run_and_is_restored(tmp_path, toy_data, monkeypatch, before):
    seen = []
    real_step = training.train_step

    def spy(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training_loop, "train_step", spy)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic)
    try:
        if before is not None:
            torch.use_deterministic_algorithms(before)  # warn_only=False
        expected_after = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic)
        training.train(toy_recipe(tmp_path, "run", max_steps=2, val_every=0, deterministic=True),
                          console=quiet())
        assert seen == [(True, True, True)] * 2
        after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.backends.cudnn.deterministic)
        assert after == expected_after
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic = previous[2]


def test_bad_option_values_are_reported_together(tmp_path, toy_data):
    with pytest.raises(HmerzooError) as err:
        training.train(toy_recipe(tmp_path, "run", accumulate=0, ema_decay=1.0, ema_every=0, ema_start=-1,
                                     compile=True, compile_backend="no_such_backend"), console=quiet())
    message = str(err.value)
    for key in ("train.accumulate", "train.ema_decay", "train.ema_every", "train.ema_start", "train.compile_backend"):
        assert key in message, key
