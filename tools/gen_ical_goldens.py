"""Generate the ICAL parity goldens in tests/goldens/ical/ by running the OFFICIAL ICAL code (qingzhenduyu/ICAL).

What it does (CPU, float32, a few minutes on 2 threads):

1. imports the official package ``ical`` from ``--repo`` (an exported tree, e.g. ``git archive`` of a clone; only
   its .py/.yaml files are needed), with the stand-ins of ``<shared>/fixtures/parity/tools/stubs`` for
   pytorch_lightning, torchmetrics, torchvision.transforms and cv2, so the unmodified official files import on a
   current torch; the official vocabulary is initialised from ``--dictionary`` (ICAL's CROHME checkpoints use the
   ``dictionary.txt`` that ships in qingzhenduyu/TAMER ``lightning_logs/version_0/``, same authors: its token order
   differs from CoMER's, ``{ } ^ _`` come last);
2. builds ``LitICAL`` twice: with the official default configuration (``config/crohme.yaml``'s model section) only
   to count its parameters, and with a REDUCED configuration (smaller DenseNet and d_model, see ``REDUCED``) for the
   committed goldens, seeded (``torch.manual_seed(0)``) and calibrated with a short Adam fit on the two fixture
   images using the official training loss (``exp + implicit (dynamic class weights) + fusion``), so that BatchNorm
   statistics are not trivial and the outputs are peaked;
3. saves the weights with the official key names (``state_dict.safetensors``, the LitICAL ``state_dict``: prefix
   ``ical_model.``), reloads them into a fresh official model and records, in eval mode: the encoder output, the
   three teacher-forced logits (explicit ``exp_proj``, implicit ``imp_proj``, fused ``fusion_proj``), the official
   loss terms, each image's teacher-forced log-likelihood of its caption alone under the fused logits (what
   ``transform`` feeds the search), and the official batched bidirectional beam search
   (``approximate_joint_search``) on the padded batch and on each image alone.

The official code is imported at run time only; nothing of it is in this project.

usage (from the project root)::

    python tools/gen_ical_goldens.py --repo /path/ICAL --dictionary /path/TAMER/lightning_logs/version_0/dictionary.txt \\
        [--commit SHA] [--shared ../shared] [--out tests/goldens/ical]

``--repo`` defaults to $HMER_REF_ICAL, ``--shared`` to $HMERZOO_SHARED or ../shared beside the project root.
tests/test_ical.py converts the weights with ``hmerzoo convert ical`` and compares with these files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REDUCED = {"d_model": 32, "growth_rate": 8, "num_layers": 4, "nhead": 8, "num_decoder_layers": 3,
           "dim_feedforward": 64, "dropout": 0.3, "dc": 8, "cross_coverage": True, "self_coverage": True}
FIT_STEPS, FIT_LR = 150, 2e-3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=os.environ.get("HMER_REF_ICAL"), help="exported tree of qingzhenduyu/ICAL")
    p.add_argument("--commit", default="b7fb63640c5b37ac7e9f56f7abc9471a66fd6b6c")
    p.add_argument("--dictionary", required=True, help="ICAL's CROHME dictionary.txt (TAMER lightning_logs/version_0)")
    p.add_argument("--shared", default=os.environ.get("HMERZOO_SHARED", str(ROOT.parent / "shared")))
    p.add_argument("--out", default=str(ROOT / "tests" / "goldens" / "ical"))
    args = p.parse_args()
    if not args.repo or not os.path.isdir(os.path.join(args.repo, "ical")):
        raise SystemExit("--repo (or $HMER_REF_ICAL) must point to an exported tree of qingzhenduyu/ICAL")
    tools = os.path.join(args.shared, "fixtures", "parity", "tools")
    sys.path.insert(0, tools)
    import common as C  # the shared fixture helpers (fit, save, count_params, ...)

    C.setup_imports(args.repo)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import yaml
    from ical.datamodule import vocab
    from ical.datamodule import datamodule as dmm
    from ical.lit_ical import LitICAL
    from ical.utils import utils as U
    from torchvision.transforms import ToTensor  # the stub, torchvision's semantics

    vocab.init(args.dictionary)
    with open(os.path.join(args.repo, "config", "crohme.yaml")) as f:
        official_hp = dict(yaml.safe_load(f)["model"])

    # the official default configuration: parameter count only
    torch.manual_seed(0)
    full_counts = C.count_params(LitICAL(**official_hp))
    print("official default parameters:", full_counts)

    hp = {**official_hp, **REDUCED}
    parity_dir = Path(args.shared) / "fixtures" / "parity" / "comer"
    images = sorted(parity_dir.glob("image*.png"))
    raw = [C.load_gray_u8(str(pth)) for pth in images]
    tens = [ToTensor()(a) for a in raw]
    words = [s["label"].split() for s in C.FIXTURE_SAMPLES]
    indices = [vocab.words2indices(w) for w in words]
    batch = dmm.collate_fn([([s["name"] for s in C.FIXTURE_SAMPLES], tens, words)])
    img, mask = batch.imgs, batch.mask
    assert batch.indices == indices
    tgt, out = U.plicit_tgt_out(indices, torch.device("cpu"))
    _, imp_out = U.plicit_tgt_out(indices, torch.device("cpu"), is_implicit=True)

    def official_losses(lit, x, m):
        exp_hat, imp_hat, fusion_hat = lit(x, m, tgt)
        return {"exp": U.ce_loss(exp_hat, out),
                "implicit": U.ce_loss(imp_hat, imp_out, need_weight=lit.hparams.dynamic_weight),
                "fusion": U.ce_loss(fusion_hat, out)}

    torch.manual_seed(0)
    lit = LitICAL(**hp)
    counts = C.count_params(lit)
    losses = C.fit(lit, lambda: sum(official_losses(lit, img, mask).values()), FIT_STEPS, FIT_LR)
    lit.eval()
    sd_path = out_dir / "state_dict.safetensors"
    C.save_state_dict(lit.state_dict(), str(sd_path), False)

    def build_loaded():
        torch.manual_seed(12345)  # everything is overwritten by the saved weights
        m = LitICAL(**hp)
        m.load_state_dict(C.load_state_dict(str(sd_path)), strict=True)
        return m.eval()

    def run(lm):
        g = {}
        inner = lm.ical_model
        with torch.no_grad():
            g["enc_feature"], g["enc_mask"] = inner.encoder(img, mask)
            g["logits_exp"], g["logits_imp"], g["logits_fusion"] = lm(img, mask, tgt)
            for k, v in official_losses(lm, img, mask).items():
                g[f"loss_{k}"] = v.reshape(())
            rec = {}
            dec = inner.decoder
            orig_bs, orig_rate = dec._beam_search, dec._rate

            def spy_bs(*a, **k):
                r = orig_bs(*a, **k)
                rec["hyps"], rec["scores"] = [h.clone() for h in r[0]], r[1].clone()
                return r

            def spy_rate(*a, **k):
                r = orig_rate(*a, **k)
                rec["rev"] = r.clone()
                return r

            dec._beam_search, dec._rate = spy_bs, spy_rate
            hyps = lm.approximate_joint_search(img, mask)
            dec._beam_search, dec._rate = orig_bs, orig_rate
            pad = max([len(h.seq) for h in hyps] + [len(h) for h in rec["hyps"]] + [1])
            g["beam_tokens"] = torch.full((len(hyps), pad), -1, dtype=torch.long)
            for i, h in enumerate(hyps):
                g["beam_tokens"][i, :len(h.seq)] = torch.tensor(h.seq, dtype=torch.long)
            g["beam_lengths"] = torch.tensor([len(h.seq) for h in hyps])
            g["beam_scores"] = torch.stack([torch.as_tensor(h.score, dtype=torch.float32) for h in hyps])
            g["beam_pass1_tokens"] = torch.full((len(rec["hyps"]), pad), -1, dtype=torch.long)
            for i, h in enumerate(rec["hyps"]):
                g["beam_pass1_tokens"][i, :len(h)] = h
            g["beam_pass1_lengths"] = torch.tensor([len(h) for h in rec["hyps"]])
            g["beam_pass1_scores"] = rec["scores"]
            g["beam_rescore_raw"] = rec["rev"]
            for i, t in enumerate(tens):
                single_mask = torch.zeros_like(t, dtype=torch.bool)
                hs = lm.approximate_joint_search(t.unsqueeze(0), single_mask)
                g[f"beam_single{i}_tokens"] = torch.tensor(hs[0].seq, dtype=torch.long)
                g[f"beam_single{i}_score"] = torch.as_tensor(hs[0].score, dtype=torch.float32).reshape(1)
        return g

    g1 = run(build_loaded())
    g2 = run(build_loaded())
    rerun = C.max_abs_diff(g1, g2)

    # each image alone: the caption's log-likelihood under the fused logits (what the search reads), both ways
    lm = build_loaded()
    cases = []
    with torch.no_grad():
        for i, (t, ids) in enumerate(zip(tens, indices)):
            case = {"name": C.FIXTURE_SAMPLES[i]["name"], "image_file": f"image{i}.png",
                    "caption": C.FIXTURE_SAMPLES[i]["label"]}
            for direction in ("l2r", "r2l"):
                t_in, t_out = U.to_tgt_output([ids], direction, torch.device("cpu"))
                feat, fmask = lm.ical_model.encoder(t.unsqueeze(0), torch.zeros_like(t, dtype=torch.bool))
                _, _, fusion = lm.ical_model.decoder(feat, fmask, t_in)
                logp = torch.log_softmax(fusion, -1)[0].gather(-1, t_out[0, :, None])[:, 0]
                case[f"{direction}_logprob"] = float(logp.sum())
            cases.append(case)

    # each image alone is imageI.png / 255 (not stored twice)
    inputs = {"img": img, "img_mask": mask, "tgt": tgt, "out": out, "imp_out": imp_out}
    golden = {**{f"input.{k}": v for k, v in inputs.items()}, **g1}
    C.save_tensors(golden, str(out_dir / "golden.safetensors"), {"model": "ical", "note": "see meta.json"})
    for i, a in enumerate(raw):
        C.save_png(a, str(out_dir / f"image{i}.png"))
    shutil.copyfile(args.dictionary, out_dir / "dictionary.txt")

    def latex(seq):
        return " ".join(vocab.idx2word[int(i)] for i in seq)

    meta = {
        "model": "ICAL",
        "repo": "qingzhenduyu/ICAL",
        "commit": args.commit,
        "dictionary_source": "qingzhenduyu/TAMER lightning_logs/version_0/dictionary.txt (ICAL's CROHME checkpoints "
                             "use it; ICAL's repository has none)",
        "official_class": "ical.lit_ical.LitICAL (inner nn.Module ical.model.ical.ICAL at attribute 'ical_model')",
        "official_default_config": official_hp,
        "official_default_parameter_count": full_counts,
        "config": hp,
        "reduced": REDUCED,
        "parameter_count": counts,
        "weights": {"file": "state_dict.safetensors", "key_prefix": "ical_model.", "dtype": "float32",
                    "provenance": f"torch.manual_seed(0), LitICAL(**config) (default PyTorch init), then {FIT_STEPS} "
                                  f"Adam steps (lr {FIT_LR}, grad-clip 5, train mode, seed 1234) on the two fixture "
                                  "images with the official training loss exp + implicit (dynamic weights) + fusion. "
                                  "Not a trained model.",
                    "fit_loss_first_last": [losses[0], losses[-1]]},
        "vocabulary": {"size": len(vocab), "special_ids": {"PAD_IDX": 0, "SOS_IDX": 1, "EOS_IDX": 2, "SPACE_IDX": 3},
                       "construction": "<pad>, <sos>, <eos>, <space>, then dictionary.txt in file order"},
        "samples": [{**s, "image_file": f"image{i}.png", "hw": list(raw[i].shape), "token_ids": indices[i]}
                    for i, s in enumerate(C.FIXTURE_SAMPLES)],
        "golden_description": {
            "input.img / input.img_mask": "official collate_fn batch (bool mask, True = padding)",
            "input.tgt / input.out": "plicit_tgt_out: [2b, L+1], L2R rows then R2L rows, <pad>=0 padded",
            "input.imp_out": "implicit targets: every token but { } ^ _ -> <space>=3 (start/stop tokens kept)",
            "enc_feature / enc_mask": "ical_model.encoder(img, img_mask)",
            "logits_exp / logits_imp / logits_fusion": "LitICAL.forward(img, img_mask, tgt): exp_proj, imp_proj "
                                                       "(SCCM), fusion_proj (the gated fusion); [2b, L+1, V]",
            "loss_exp / loss_implicit / loss_fusion": "official ce_loss terms of training_step, in eval mode",
            "beam_*": "approximate_joint_search on the padded batch (transform = fusion logits): best hyp per "
                      "image, its score; pass1 = the 2*b*beam hypotheses and scores before rescoring; "
                      "rescore_raw = _rate output as computed",
            "beam_single{i}_*": "approximate_joint_search on image i alone (all-False mask)",
        },
        "single_image_scores": cases,
        "beam_search_result": {
            "batched": [{"tokens": g1["beam_tokens"][i, :int(g1["beam_lengths"][i])].tolist(),
                         "latex": latex(g1["beam_tokens"][i, :int(g1["beam_lengths"][i])]),
                         "score": float(g1["beam_scores"][i])} for i in range(2)],
            "single": [{"tokens": g1[f"beam_single{i}_tokens"].tolist(), "latex": latex(g1[f"beam_single{i}_tokens"]),
                        "score": float(g1[f"beam_single{i}_score"])} for i in range(2)]},
        "tolerances": {"rerun_same_process_max_abs_diff": rerun},
        "environment": C.env_info(),
    }
    C.write_json(meta, str(out_dir / "meta.json"))
    print(json.dumps(meta["beam_search_result"], indent=1))
    print("sizes:", C.file_sizes(str(out_dir)))


if __name__ == "__main__":
    main()
