"""Generate the training-step parity goldens in tests/goldens/train_step/ by running the OFFICIAL code.

For each system (ABM, BTTR, CoMER, HMER-MTL) this loads the parity-fixture weights into the official model, puts it
in eval mode (dropout off, BatchNorm on its running statistics) and in float64, computes the official training loss
on the fixture batch with every term as the official training step computes it, calls backward, and stores:

- ``loss.<term>``: the loss terms (0-d float64);
- ``grad.<official parameter name>``: the gradient of a few named parameters, one or more per module family
  (flattened; parameters with more than ``MAX_ELEMENTS`` elements are sampled with a stride recorded in the
  metadata, after computing the gradient of the whole parameter);
- ``grad_norms``: the L2 norm of the gradient of EVERY parameter (float64), names in the metadata, so a gradient
  that is wrong anywhere in the model shows up.

Why float64: the official code's own float32 gradients are off by up to ~1e-3 (relative) in ABM's encoder (the
metadata records each system's official float32-vs-float64 deviation), which is float32 rounding, not a property
of the model; a float32 re-implementation must be compared with the exact values, not with that noise.

What the official training steps are:

- BTTR, CoMER: ``LitBTTR.training_step`` / ``LitCoMER.training_step`` (called as is): ``ce_loss`` over the
  stacked L2R + R2L rows.
- HMER-MTL: ``LitMTL.training_step`` (called as is; its ``self.log`` calls are recorded to get the terms):
  ``out_loss * lambda_1 + imp_loss * lambda_2``.
- ABM: ``train.py`` is a script, so its loss lines are re-expressed here on the output of the official
  ``Encoder_Decoder.forward``: per-sequence masked CE per branch (``(loss * y_mask).sum(0) / y_mask.sum(0)``,
  ``.mean()``), and ``beta * T^2 * KLDivLoss(batchmean)(log_softmax(R2L / T), softmax(L2R / T))`` over the rows
  ``scores[1:]`` and time-flipped ``scores2[1:]`` selected by their masks (T = 4, beta = 0.5).

Needs (nothing of it is imported by hmerzoo or its tests):

- ``../shared`` beside the project root (or ``--shared`` / ``$HMERZOO_SHARED``): ``fixtures/parity/<model>/``
  (weights, inputs, meta.json) and ``fixtures/parity/tools/stubs`` (stand-ins for pytorch_lightning, torchmetrics,
  torchvision.transforms, cv2 that let the unmodified official files import on a current CPU torch);
- exported trees of the official repositories at the commits recorded in each fixture's meta.json
  (Green-Wood/BTTR, Green-Wood/CoMER, XH-B/ABM, trungtndev/HMER-MTL), given with ``--bttr-repo``, ``--comer-repo``,
  ``--abm-repo``, ``--mtl-repo`` (or $HMER_REF_BTTR, $HMER_REF_COMER, $HMER_REF_ABM, $HMER_REF_MTL). Only their
  .py/.yaml/.txt files are needed (e.g. ``git archive <commit>`` of a clone, skipping the large checkpoint and data
  files). The official code is imported at run time only; none of it is in this project.
- torch, safetensors, numpy, PyYAML, Pillow (the hmerzoo venv has them).

Run from the project root (a few minutes on 2 CPU threads: every system runs in float64, then in float32 to
measure the official code's own rounding noise)::

    python tools/gen_train_step_goldens.py --bttr-repo /path/BTTR --comer-repo /path/CoMER \\
        --abm-repo /path/ABM --mtl-repo /path/HMER-MTL [--only comer ...] [--out tests/goldens/train_step]

Each system runs in its own subprocess (the official projects have clashing top-level module names).
tests/test_train_step_parity.py compares hmerzoo's ``model(batch)`` loss terms and gradients with these files.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("abm", "bttr", "comer", "hmer_mtl")
FIXTURE_DIR = {"abm": "abm", "bttr": "bttr", "comer": "comer", "hmer_mtl": "hmer_mtl"}
REPO_ENV = {"abm": "HMER_REF_ABM", "bttr": "HMER_REF_BTTR", "comer": "HMER_REF_COMER", "hmer_mtl": "HMER_REF_MTL"}
REPO_ARG = {"abm": "abm_repo", "bttr": "bttr_repo", "comer": "comer_repo", "hmer_mtl": "mtl_repo"}
MAX_ELEMENTS = 2048  # per stored gradient; larger ones are sampled with a stride

_COMER_FAMILY = [  # CoMER and HMER-MTL (a fork with the same layout), prefix 'comer_model.'
    "encoder.model.conv1.weight",                       # encoder stem conv
    "encoder.model.norm1.weight",                       # stem BN
    "encoder.model.dense1.0.conv1.weight",              # dense block, bottleneck conv
    "encoder.model.dense2.3.bn2.bias",                  # dense block BN
    "encoder.model.trans2.conv1.weight",                # transition
    "encoder.model.post_norm.weight",                   # final BN
    "encoder.feature_proj.weight",                      # 1x1 projection
    "encoder.norm.bias",                                # encoder LayerNorm
    "decoder.word_embed.0.weight",                      # embedding
    "decoder.word_embed.1.weight",                      # embedding LayerNorm
    "decoder.norm.bias",                                # decoder input LayerNorm
    "decoder.model.layers.0.self_attn.in_proj_weight",  # self-attention projection
    "decoder.model.layers.1.self_attn.out_proj.bias",
    "decoder.model.layers.0.multihead_attn.in_proj_weight",  # cross-attention projection
    "decoder.model.layers.2.multihead_attn.in_proj_bias",
    "decoder.model.layers.1.linear1.bias",              # feed-forward
    "decoder.model.layers.2.norm3.weight",              # post-norm LayerNorm
    "decoder.model.arm.conv.weight",                    # attention refinement (ARM)
    "decoder.model.arm.proj.weight",
    "decoder.model.arm.post_norm.bn.weight",
    "decoder.proj.weight",                              # output projection
    "decoder.proj.bias",
]
GRAD_PARAMS = {
    "comer": ["comer_model." + k for k in _COMER_FAMILY],
    "hmer_mtl": ["comer_model." + k for k in _COMER_FAMILY] + ["comer_model." + k for k in (
        "decoder.model.arm.cbam.channel_attention.excitation.0.weight",  # CBAM in the ARM
        "decoder.model.arm.cbam.spatial_attention.conv.weight",
        "decoder.model.arm.cbam.spatial_attention.bn.weight",
        "decoder.proj_imp.weight",                                       # skeleton (implicit) head
        "decoder.proj_imp.bias")],
    "bttr": ["bttr." + k for k in (
        "encoder.model.conv1.weight", "encoder.model.norm1.weight", "encoder.model.dense1.0.conv1.weight",
        "encoder.model.dense2.3.bn2.bias", "encoder.model.trans2.conv1.weight", "encoder.model.post_norm.weight",
        "encoder.feature_proj.0.weight", "encoder.norm.bias", "decoder.word_embed.0.weight",
        "decoder.word_embed.1.weight", "decoder.model.layers.0.self_attn.in_proj_weight",
        "decoder.model.layers.1.self_attn.out_proj.bias", "decoder.model.layers.0.multihead_attn.in_proj_weight",
        "decoder.model.layers.2.multihead_attn.in_proj_bias", "decoder.model.layers.1.linear1.bias",
        "decoder.model.layers.2.norm3.weight", "decoder.proj.weight", "decoder.proj.bias")],
    # ABM: both branches (L2R: no suffix, R2L: '2'); the mutual distillation reaches both through their logits
    "abm": ["encoder1.conv1.weight", "encoder1.dense1.0.conv1.weight", "encoder1.dense2.3.bn2.bias",
            "encoder1.trans2.conv1.weight", "encoder1.dense3.15.conv2.weight"] + [k.replace("@", s) for s in ("", "2")
            for k in ("init_GRU_model@.fc.bias",          # initial state
                      "emb_model@.embedding.weight",      # embedding
                      "gru_model@.conv_Ua.bias",          # attention: key projection
                      "gru_model@.fc_Wa.weight",          # attention: query projection
                      "gru_model@.conv_Q.weight",         # coverage convs (11x11, 5x5) and projections
                      "gru_model@.conv_Q2.weight",
                      "gru_model@.fc_Uf2.bias",
                      "gru_model@.fc_va.weight",          # attention energy
                      "gru_model@.fc_Wyz.weight",         # GRU 1 gates (packed in hmerzoo)
                      "gru_model@.fc_Uhr.weight",
                      "gru_model@.fc_Wch.weight",         # GRU 2 (context-driven) gates
                      "gru_model@.fc_Uhz2.bias",
                      "gru_prob_model@.fc_Wct.bias",      # output layer
                      "gru_prob_model@.fc_W0.weight",
                      "gru_prob_model@.fc_W0.bias")],
}


# ---------------------------------------------------------------------------------------------------------------
def shared_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("HMERZOO_SHARED") or ROOT.parent / "shared")


def stride_for(numel: int) -> int:
    return max(1, math.ceil(numel / MAX_ELEMENTS))


def step_result(named_params, loss_terms: dict) -> dict:
    """Loss terms, every parameter's gradient (detached) and gradient norm, by official name."""
    import torch

    params = {n: p for n, p in named_params if p.requires_grad}
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    norms = torch.stack([grads[n].double().norm() if n in grads else torch.zeros((), dtype=torch.float64)
                         for n in params])
    return {"terms": {k: v.detach().double().reshape(()) for k, v in loss_terms.items()}, "grads": grads,
            "names": list(params), "norms": norms, "no_grad": [n for n in params if n not in grads]}


def save(system: str, exact: dict, single: dict, meta: dict, out: Path) -> None:
    """Save the float64 run's loss terms, chosen gradients (sampled) and gradient norms; record how far the official
    code's own float32 run is from it."""
    import torch
    from safetensors.torch import save_file

    missing = [k for k in GRAD_PARAMS[system] if k not in exact["names"]]
    if missing:
        raise SystemExit(f"{system}: parameters not in the official model: {missing}")
    if exact["no_grad"] or set(GRAD_PARAMS[system]) - set(exact["grads"]):
        raise SystemExit(f"{system}: parameters without a gradient: {exact['no_grad']}")
    tensors = {f"loss.{k}": v for k, v in exact["terms"].items()}
    strides, noise = {}, {}
    for name in GRAD_PARAMS[system]:
        strides[name] = stride_for(exact["grads"][name].numel())
        tensors[f"grad.{name}"] = exact["grads"][name].flatten()[::strides[name]].float().clone()
        # the official float32 gradient's largest error, in units of the gradient's largest magnitude
        g64, g32 = exact["grads"][name], single["grads"][name].double()
        noise[name] = float((g32 - g64).abs().max() / g64.abs().max().clamp_min(1e-300))
    tensors["grad_norms"] = exact["norms"]
    # the official float32 run against the float64 one: the noise any float32 implementation carries
    scale = exact["norms"].max()
    norm_dev = ((single["norms"] - exact["norms"]).abs() / (exact["norms"] + 1e-5 * scale)).tolist()
    worst = max(range(len(norm_dev)), key=norm_dev.__getitem__)
    fp32 = {"loss_terms_abs": {k: float((single["terms"][k] - v).abs()) for k, v in exact["terms"].items()},
            "grad_norm_max_rel": norm_dev[worst], "grad_norm_max_rel_param": exact["names"][worst]}
    metadata = {
        "system": system,
        "official_repo": meta["repo"], "official_commit": meta["commit"],
        "grad_strides": json.dumps(strides), "grad_norm_names": json.dumps(exact["names"]),
        "official_float32_grad_noise": json.dumps(noise),
        "official_float32_vs_float64": json.dumps(fp32),
        "torch": torch.__version__, "generator": "tools/gen_train_step_goldens.py",
        "mode": "official code in float64 on the CPU, eval mode (dropout off, BatchNorm running statistics); "
                "gradients stored as float32, loss terms and gradient norms as float64",
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{system}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    print(f"{system}: {path} ({path.stat().st_size} bytes); losses "
          + ", ".join(f"{k}={float(v):.8f}" for k, v in exact["terms"].items())
          + f"; official float32 vs float64: {fp32}; largest float32 gradient noise: "
          + str(max(noise.items(), key=lambda kv: kv[1])), flush=True)


def _load_fixture(fixture: Path):
    from safetensors.torch import load_file

    meta = json.loads((fixture / "meta.json").read_text())
    return meta, load_file(str(fixture / "state_dict.safetensors")), load_file(str(fixture / "golden.safetensors"))


def _cast(state: dict, dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def _lightning_system(system: str, fixture: Path, repo: Path, dtype) -> tuple[dict, dict]:
    """BTTR, CoMER, HMER-MTL: the official LightningModule's own training_step."""
    import torch
    import yaml

    meta, state, golden = _load_fixture(fixture)
    pkg = {"bttr": "bttr", "comer": "comer", "hmer_mtl": "mtl"}[system]
    lit_cls = getattr(importlib.import_module({"bttr": "bttr.lit_bttr", "comer": "comer.lit_comer",
                                               "hmer_mtl": "mtl.lit_mtl"}[system]),
                      {"bttr": "LitBTTR", "comer": "LitCoMER", "hmer_mtl": "LitMTL"}[system])
    batch_cls = importlib.import_module(f"{pkg}.datamodule.datamodule").Batch
    utils = importlib.import_module("bttr.utils" if system == "bttr" else f"{pkg}.utils.utils")
    hp = yaml.safe_load((repo / "config.yaml").read_text())["model"]
    assert hp == meta["config"], f"{system}: config.yaml differs from the fixture's meta.json config"

    torch.manual_seed(0)  # init is irrelevant: everything is overwritten
    lit = lit_cls(**hp)
    lit.load_state_dict(_cast(state, torch.float32), strict=True)
    lit.to(dtype).eval()
    indices = [list(s["token_ids"]) for s in meta["samples"]]
    batch = batch_cls(img_bases=[s["name"] for s in meta["samples"]], imgs=golden["input.img"].to(dtype),
                      mask=golden["input.img_mask"], indices=indices)
    # the batch is the fixture's: the official target builder gives the stored teacher-forcing tensors
    tgt, tgt_out = utils.to_bi_tgt_out(indices, torch.device("cpu"))
    assert torch.equal(tgt, golden["input.tgt"]) and torch.equal(tgt_out, golden["input.out"])

    logged = {}
    lit.log = lambda name, value, *a, **k: logged.__setitem__(name, value.detach())  # record what it logs
    lit.zero_grad(set_to_none=True)
    loss = lit.training_step(batch, 0)
    loss.backward()
    assert loss.dtype == dtype and torch.equal(logged["train_loss"], loss.detach())
    if system == "hmer_mtl":
        terms = {"out_loss": logged["train_out_loss"], "imp_loss": logged["train_imp_loss"],
                 "lambda_1": torch.tensor(float(hp["lambda_1"])), "lambda_2": torch.tensor(float(hp["lambda_2"])),
                 "total": loss}
    else:
        terms = {"total": loss}
    return step_result(lit.named_parameters(), terms), meta


def _abm(fixture: Path, repo: Path, dtype) -> tuple[dict, dict]:
    """ABM: the official Encoder_Decoder forward, and train.py's loss lines on its output."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    torch.Tensor.cuda = lambda self, *a, **k: self  # the official forward calls .cuda(); run it on the CPU
    torch.nn.Module.cuda = lambda self, *a, **k: self
    meta, state, golden = _load_fixture(fixture)
    ed = importlib.import_module("encoder_decoder")
    u = importlib.import_module("utils")
    params = dict(meta["config"])
    images = [np.array(Image.open(fixture / s["image_file"]), dtype=np.uint8)[None] for s in meta["samples"]]
    seqs = [list(s["token_ids"]) for s in meta["samples"]]
    arrays = u.prepare_data_bidecoder(params, images, seqs)  # the official batch builder of train.py
    names = ["x", "x_mask", "y_in", "y_out", "y_mask", "y_reverse_in", "y_reverse_out", "y_reverse_mask"]
    t = {n: torch.from_numpy(a) for n, a in zip(names, arrays)}
    for n in names:
        assert torch.equal(t[n], golden[f"input.{n}"]), f"abm: {n} differs from the fixture batch"
    t = _cast(t, dtype)

    torch.manual_seed(0)
    model = ed.Encoder_Decoder(params)
    model.load_state_dict(_cast(state, torch.float32), strict=True)
    model.to(dtype).eval()
    model.zero_grad(set_to_none=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the official forward allocates its states with torch.zeros
    try:
        y, y_mask = t["y_in"].permute(1, 0), t["y_mask"].permute(1, 0)
        yr, yr_mask = t["y_reverse_in"].permute(1, 0), t["y_reverse_mask"].permute(1, 0)
        scores, _, scores2, _ = model(params, t["x"], t["x_mask"], y, y_mask, yr, yr_mask)
    finally:
        torch.set_default_dtype(previous)
    assert scores.dtype == dtype

    # train.py, one update (time-major [T, B, K] after its permutes)
    y_out, y_mask_t = t["y_out"], t["y_mask"]
    yr_out, yr_mask_t = t["y_reverse_out"], t["y_reverse_mask"]
    s1, s2 = scores.permute(1, 0, 2), scores2.permute(1, 0, 2)

    def branch_ce(s, target, mask):
        ce = F.cross_entropy(s.reshape(-1, s.shape[2]), target.reshape(-1), reduction="none").view(target.shape)
        return ((ce * mask).sum(0) / mask.sum(0)).mean()

    def kd_rows(s, mask, flip):
        s, mask = s[1:], mask[1:]
        if flip:
            s, mask = torch.flip(s, [0]), torch.flip(mask, [0])
        rows = torch.nonzero(mask.reshape(-1)).view(-1)
        return torch.index_select(s.reshape(-1, s.shape[2]), 0, rows)

    temperature, beta = 4.0, 0.5
    l2r, r2l = branch_ce(s1, y_out, y_mask_t), branch_ce(s2, yr_out, yr_mask_t)
    teacher, student = kd_rows(s1, y_mask_t, False), kd_rows(s2, yr_mask_t, True)
    kl = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / temperature, dim=-1),
                                                   F.softmax(teacher / temperature, dim=-1)) * temperature ** 2
    total = l2r + r2l + kl * beta
    total.backward()
    terms = {"l2r": l2r, "r2l": r2l, "kl": kl, "beta": torch.tensor(beta), "total": total}
    return step_result(model.named_parameters(), terms), meta


def worker(system: str, shared: Path, repo: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(2)
    stubs = shared / "fixtures" / "parity" / "tools" / "stubs"
    for p in (str(stubs), str(repo)):
        sys.path.insert(0, p)
    fixture = shared / "fixtures" / "parity" / FIXTURE_DIR[system]
    step = (lambda dtype: _abm(fixture, repo, dtype)) if system == "abm" else (
        lambda dtype: _lightning_system(system, fixture, repo, dtype))
    exact, meta = step(torch.float64)
    single, _ = step(torch.float32)
    save(system, exact, single, meta, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", help="the shared folder (default: $HMERZOO_SHARED, else ../shared beside the project)")
    for system in SYSTEMS:
        p.add_argument(f"--{REPO_ARG[system].replace('_', '-')}", dest=REPO_ARG[system],
                       default=os.environ.get(REPO_ENV[system]), help=f"official {system} tree (${REPO_ENV[system]})")
    p.add_argument("--only", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--out", default=str(ROOT / "tests" / "goldens" / "train_step"))
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = p.parse_args()
    shared = shared_dir(args.shared)
    if args.worker:
        worker(args.worker, shared, Path(getattr(args, REPO_ARG[args.worker])), Path(args.out))
        return
    if not (shared / "fixtures" / "parity").is_dir():
        raise SystemExit(f"no parity fixtures under {shared} (pass --shared or set HMERZOO_SHARED)")
    for system in args.only:
        repo = getattr(args, REPO_ARG[system])
        if not repo or not Path(repo).is_dir():
            raise SystemExit(f"{system}: pass the official tree with --{REPO_ARG[system].replace('_', '-')} "
                             f"or ${REPO_ENV[system]}")
        cmd = [sys.executable, __file__, "--worker", system, "--shared", str(shared), "--out", args.out,
               f"--{REPO_ARG[system].replace('_', '-')}", repo]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
