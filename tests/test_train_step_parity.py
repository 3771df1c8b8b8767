"""Training-step parity: hmerzoo's ``model(batch)`` loss terms and gradients equal the official training step's.

The goldens (tests/goldens/train_step/<system>.safetensors) were made by tools/gen_train_step_goldens.py, which runs
the official code on the parity fixture batch in eval mode (dropout off): the loss terms as the official training
step computes them, a sampled gradient of named parameters from every module family, and the gradient norm of every
parameter. Here the fixture weights are converted with ``hmerzoo.convert.convert``; official parameter names are
mapped to hmerzoo's by locating each official tensor in the converted model (the converter's own mapping, packed
ABM GRU gates included), so renames in the converter are followed without a list in this file.

Fixture-dependent tests skip when ../shared/fixtures/parity is absent (override with $HMERZOO_SHARED).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hmerzoo
from hmerzoo.batch import Batch
from hmerzoo.convert import convert

GOLDENS = Path(__file__).resolve().parent / "goldens" / "train_step"
SYSTEMS = ("abm", "bttr", "comer", "hmer_mtl")
RTOL = 1e-4
# Absolute floor for gradients, as a fraction of the compared tensor's largest magnitude: elements far below that
# scale are float32 rounding (sums of thousands of terms that cancel), so they are compared to the floor, not to
# their own size. Measured against the float64 goldens, hmerzoo's float32 gradients are within 1e-5 of the scale
# except the first encoder layers of ABM and HMER-MTL: up to 6.4e-5 with 2 threads, 3e-6 with one (the rounding
# depends on the thread count). The official code's own float32 run is up to 6e-3 off in ABM's encoder (its
# attention exponentiates without subtracting the maximum); each golden's metadata records it.
ATOL_FRACTION = 2e-4
# Gradient norms: the same rounding moves a norm by up to 6.4e-5 (relative) with 2 threads, hence 2e-4; the floor
# (a fraction of the largest norm) only covers norms that are analytically zero (e.g. the bias of an attention
# energy, which softmax ignores: ~1e-8 here).
NORM_RTOL = 2e-4
NORM_FLOOR = 1e-6

_CACHE: dict[str, dict] = {}


def load_golden(system: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(GOLDENS / f"{system}.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def expected_terms(system: str, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official terms as hmerzoo names them: ``ce`` the main objective, heads by their recipe names."""
    if system == "abm":  # train.py: CE_L2R + CE_R2L + beta * KL
        return {"ce": g["loss.l2r"] + g["loss.r2l"], "distill": g["loss.beta"] * g["loss.kl"]}
    if system == "hmer_mtl":  # lit_mtl.py: out_loss * lambda_1 + imp_loss * lambda_2
        return {"ce": g["loss.lambda_1"] * g["loss.out_loss"], "skeleton": g["loss.lambda_2"] * g["loss.imp_loss"]}
    return {"ce": g["loss.total"]}  # BTTR, CoMER: ce_loss over both directions' rows


def fixture_batch(system: str, golden: dict[str, torch.Tensor], meta: dict) -> Batch:
    tokens = [list(s["token_ids"]) for s in meta["samples"]]
    if system == "abm":  # official float mask, 1 = valid -> True = padding
        return Batch(images=golden["input.x"], image_mask=golden["input.x_mask"] < 0.5, tokens=tokens)
    return Batch(images=golden["input.img"], image_mask=golden["input.img_mask"], tokens=tokens)


class RowIndex:
    """Where each row of each hmerzoo parameter is, by its exact bytes (a parameter's rows: its slices along dim 0;
    a vector's rows are its elements)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.rows = {name: p.detach().reshape(p.shape[0] if p.dim() else 1, -1) for name, p in params.items()}
        self.index: dict[tuple, list[tuple[str, int]]] = {}
        for name, rows in self.rows.items():
            shape = tuple(params[name].shape[1:])
            for i, row in enumerate(rows.numpy()):
                self.index.setdefault((shape, row.tobytes()), []).append((name, i))

    def locate(self, official: torch.Tensor) -> list[tuple[str, int]]:
        """Every (hmerzoo parameter, first row) whose rows hold exactly this official tensor."""
        n = official.shape[0] if official.dim() else 1
        flat = official.reshape(n, -1)
        key = (tuple(official.shape[1:]), flat[0].numpy().tobytes())
        return [(name, start) for name, start in self.index.get(key, [])
                if torch.equal(self.rows[name][start:start + n], flat)]


def run(system: str, parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Convert, one forward + backward on the fixture batch in eval mode, and the official -> hmerzoo mapping."""
    from safetensors.torch import load_file

    if system in _CACHE:
        return _CACHE[system]
    directory = parity_dir / system
    if not (directory / "state_dict.safetensors").is_file():
        pytest.skip(f"{system} parity fixtures not found in {directory}")
    meta = json.loads((directory / "meta.json").read_text())
    golden_inputs = load_file(str(directory / "golden.safetensors"))
    official = load_file(str(directory / "state_dict.safetensors"))
    model = hmerzoo.load_model(convert(system, directory / "state_dict.safetensors",
                                       tmp_path_factory.mktemp(f"{system}_train_step")))
    model.eval()  # as the goldens: dropout off, BatchNorm on running statistics
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(fixture_batch(system, golden_inputs, meta))
        out["loss"].backward()
    params = dict(model.named_parameters())
    golden, metadata = load_golden(system)
    mapping, index, names = {}, RowIndex(params), json.loads(metadata["grad_norm_names"])
    for name in names:
        if name in mapping:
            continue
        hits = index.locate(official[name].float())
        # official tensors with equal values (e.g. ABM's two coverage biases, which feed one sum and so trained
        # alike) are found at the same places: pair them in order - an equal-valued swap changes nothing
        twins = [name] if len(hits) == 1 else [
            n for n in names if official[n].shape == official[name].shape and torch.equal(official[n], official[name])]
        assert len(hits) == len(twins), (f"{system}: official {twins} found {len(hits)} times in the converted "
                                         f"model: {hits}")
        mapping.update(zip(twins, hits))
    _CACHE[system] = {"out": out, "params": params, "golden": golden, "metadata": metadata, "mapping": mapping,
                      "official": official}
    return _CACHE[system]


def hmerzoo_grad(result: dict, official_name: str) -> torch.Tensor:
    """hmerzoo's gradient of the official parameter, in the official shape."""
    name, start = result["mapping"][official_name]
    shape = result["official"][official_name].shape
    grad = result["params"][name].grad
    assert grad is not None, f"{name} (official {official_name}) got no gradient"
    n = shape[0] if len(shape) else 1
    rows = grad.reshape(grad.shape[0] if grad.dim() else 1, -1)
    return rows[start:start + n].reshape(shape)


def close(ours: torch.Tensor, golden: torch.Tensor, what: str, atol_fraction: float = ATOL_FRACTION) -> float:
    """Assert rtol 1e-4 with an absolute floor at the tensor's scale; return the max relative error (at that floor)."""
    ours, golden = ours.double(), golden.double()
    atol = atol_fraction * float(golden.abs().max()) if golden.numel() else 0.0
    torch.testing.assert_close(ours, golden, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")
    return float(((ours - golden).abs() / (golden.abs() + atol / RTOL).clamp_min(1e-30)).max())


# ---------------------------------------------------------------------------------------------------------------
# fixture-independent: the goldens are what the generator says
@pytest.mark.parametrize("system", SYSTEMS)
def test_goldens_are_small_and_complete(system: str) -> None:
    path = GOLDENS / f"{system}.safetensors"
    assert path.stat().st_size < 500_000
    golden, metadata = load_golden(system)
    strides = json.loads(metadata["grad_strides"])
    names = json.loads(metadata["grad_norm_names"])
    assert torch.isfinite(golden["loss.total"]) and float(golden["loss.total"]) > 0
    # the terms hmerzoo reports add up to the official total
    torch.testing.assert_close(sum(expected_terms(system, golden).values()), golden["loss.total"], rtol=1e-6, atol=0)
    assert len(strides) >= 15 and all(f"grad.{k}" in golden for k in strides)
    assert all(float(golden[f"grad.{k}"].abs().max()) > 0 for k in strides)  # every chosen parameter is reached
    assert golden["grad_norms"].shape == (len(names),) and float(golden["grad_norms"].max()) > 0


# ---------------------------------------------------------------------------------------------------------------
# fixture-dependent: hmerzoo's training step equals the official one
@pytest.mark.parametrize("system", SYSTEMS)
def test_loss_terms(system: str, parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    result = run(system, parity_dir, tmp_path_factory)
    golden, out = result["golden"], result["out"]
    expected = expected_terms(system, golden)
    assert set(out["losses"]) == set(expected)
    for name, value in expected.items():
        close(out["losses"][name].detach(), value, f"{system} loss term {name}", atol_fraction=0)
    close(out["loss"].detach(), golden["loss.total"], f"{system} total loss", atol_fraction=0)


@pytest.mark.parametrize("system", SYSTEMS)
def test_named_gradients(system: str, parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    result = run(system, parity_dir, tmp_path_factory)
    strides = json.loads(result["metadata"]["grad_strides"])
    for official_name, stride in strides.items():
        ours = hmerzoo_grad(result, official_name).flatten()[::stride]
        close(ours, result["golden"][f"grad.{official_name}"], f"{system} grad of {official_name} "
              f"(hmerzoo {result['mapping'][official_name][0]})")


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_gradient_norm(system: str, parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every parameter's gradient norm equals the official one, so no part of the model is left unchecked."""
    result = run(system, parity_dir, tmp_path_factory)
    names = json.loads(result["metadata"]["grad_norm_names"])
    ours = torch.stack([hmerzoo_grad(result, n).double().norm() for n in names])
    golden = result["golden"]["grad_norms"]
    floor = NORM_FLOOR * float(golden.max())
    bad = [(n, float(a), float(b)) for n, a, b in zip(names, ours, golden)
           if abs(float(a) - float(b)) > NORM_RTOL * abs(float(b)) + floor]
    assert not bad, f"{system}: {len(bad)} of {len(names)} gradient norms differ (name, hmerzoo, official): {bad[:8]}"
    # every hmerzoo parameter is one of the official ones (or a packed group of them): nothing trains unchecked
    covered = {name for name, _ in result["mapping"].values()}
    assert covered == {n for n, p in result["params"].items() if p.requires_grad}
