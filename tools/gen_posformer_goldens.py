"""Generate the PosFormer parity goldens in tests/goldens/posformer/ by running the OFFICIAL PosFormer code
(SJTU-DeepVisionLab/PosFormer).

What it does (CPU, float32, a few minutes on 2 threads):

1. imports the official package ``Pos_Former`` from ``--repo`` (an exported tree; only its .py/.txt/.yaml files are
   needed) with the stand-ins of ``<shared>/fixtures/parity/tools/stubs`` for pytorch_lightning, torchmetrics,
   torchvision.transforms and cv2; the vocabulary is the repository's ``Pos_Former/datamodule/dictionary.txt``. The
   official forward moves its position codes with ``.cuda()``; on this CPU run ``torch.Tensor.cuda`` returns the
   tensor itself (nothing else is changed);
2. builds ``LitPosFormer`` with the official default configuration (``config.yaml``) only to count its parameters,
   and with a REDUCED configuration (``REDUCED``) for the committed goldens: seeded (``torch.manual_seed(0)``),
   calibrated with a short Adam fit on the two fixture images with the official training loss
   ``(CE + 0.25 CE_level + 0.25 CE_pos) / 1.5``;
3. saves the weights with the official key names (``state_dict.safetensors``, prefix ``model.``), reloads them into
   a fresh official model and records, in eval mode: the encoder output, the teacher-forced word logits, the
   level and position logits of the position decoder, its input codes and targets (``label_make_muti``), the
   official loss terms, and the official beam search (the main decoder alone).

The official code is imported at run time only; nothing of it is in this project.

usage (from the project root)::

    python tools/gen_posformer_goldens.py --repo /path/PosFormer [--commit SHA] [--shared ../shared]
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
# captions whose official position-forest codes and targets are recorded
FOREST_CASES = [
    r"x ^ { 2 } = \sum _ { a = 1 } ^ { 3 } x _ { a } ^ { 2 }",
    r"\frac { a + 1 } { b ^ { 2 } } - \sqrt [ 3 ] { x }",
    r"\sqrt { \frac { 1 } { 2 } }",
    r"e ^ { x ^ { y ^ { z ^ { w ^ { v } } } } }",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=os.environ.get("HMER_REF_POSFORMER"),
                   help="exported tree of SJTU-DeepVisionLab/PosFormer")
    p.add_argument("--commit", default="082ff9f8d24eb2138403bb10277a344b2615f6b9")
    p.add_argument("--shared", default=os.environ.get("HMERZOO_SHARED", str(ROOT.parent / "shared")))
    p.add_argument("--out", default=str(ROOT / "tests" / "goldens" / "posformer"))
    args = p.parse_args()
    if not args.repo or not os.path.isdir(os.path.join(args.repo, "Pos_Former")):
        raise SystemExit("--repo (or $HMER_REF_POSFORMER) must point to an exported tree of "
                         "SJTU-DeepVisionLab/PosFormer")
    sys.path.insert(0, os.path.join(args.shared, "fixtures", "parity", "tools"))
    import common as C  # the shared fixture helpers (fit, save, count_params, ...)

    C.setup_imports(args.repo)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official forward calls .cuda(); CPU run
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import yaml
    from Pos_Former.datamodule import datamodule as dmm
    from Pos_Former.datamodule import label_make_muti as LM
    from Pos_Former.datamodule import vocab
    from Pos_Former.lit_posformer import LitPosFormer
    from Pos_Former.utils import utils as U
    from torchvision.transforms import ToTensor  # the stub, torchvision's semantics

    dictionary = os.path.join(args.repo, "Pos_Former", "datamodule", "dictionary.txt")
    with open(os.path.join(args.repo, "config.yaml")) as f:
        official_hp = dict(yaml.safe_load(f)["model"])
    torch.manual_seed(0)
    full_counts = C.count_params(LitPosFormer(**official_hp))
    print("official default parameters:", full_counts)

    hp = {**official_hp, **REDUCED}
    images = sorted((Path(args.shared) / "fixtures" / "parity" / "comer").glob("image*.png"))
    raw = [C.load_gray_u8(str(pth)) for pth in images]
    tens = [ToTensor()(a) for a in raw]
    words = [s["label"].split() for s in C.FIXTURE_SAMPLES]
    indices = [vocab.words2indices(w) for w in words]
    batch = dmm.collate_fn([([s["name"] for s in C.FIXTURE_SAMPLES], tens, words)])
    img, mask = batch.imgs, batch.mask
    tgt, out = U.to_bi_tgt_out(indices, torch.device("cpu"))
    codes = torch.tensor(LM.tgt2muti_label(tgt.tolist()), dtype=torch.float32)
    levels, positions = (torch.tensor(x, dtype=torch.long) for x in LM.out2layernum_and_pos(tgt.tolist()))

    def official_losses(lit):
        out_hat, out_layer, out_pos = lit.model(img, mask, tgt, None)
        ce, layer, pos = U.ce_loss_all(out_hat, out, out_layer, levels, out_pos, positions)
        return {"ce": ce, "layer": layer, "pos": pos, "total": (ce + 0.25 * layer + 0.25 * pos) / 1.5}

    torch.manual_seed(0)
    lit = LitPosFormer(**hp)
    counts = C.count_params(lit)
    losses = C.fit(lit, lambda: official_losses(lit)["total"], FIT_STEPS, FIT_LR)
    lit.eval()
    sd_path = out_dir / "state_dict.safetensors"
    C.save_state_dict(lit.state_dict(), str(sd_path), False)

    def build_loaded():
        torch.manual_seed(12345)
        m = LitPosFormer(**hp)
        m.load_state_dict(C.load_state_dict(str(sd_path)), strict=True)
        return m.eval()

    def run(lm):
        g = {}
        inner = lm.model
        with torch.no_grad():
            g["enc_feature"], g["enc_mask"] = inner.encoder(img, mask)
            g["logits"], g["level_logits"], g["pos_logits"] = inner(img, mask, tgt, None)
            for k, v in official_losses(lm).items():
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
                hs = lm.approximate_joint_search(t.unsqueeze(0), torch.zeros_like(t, dtype=torch.bool))
                g[f"beam_single{i}_tokens"] = torch.tensor(hs[0].seq, dtype=torch.long)
                g[f"beam_single{i}_score"] = torch.as_tensor(hs[0].score, dtype=torch.float32).reshape(1)
        return g

    g1 = run(build_loaded())
    g2 = run(build_loaded())
    rerun = C.max_abs_diff(g1, g2)

    forest_cases = []
    for latex in FOREST_CASES:
        ids = vocab.words2indices(latex.split())
        t, _ = U.to_bi_tgt_out([ids], torch.device("cpu"))
        lv, ps = LM.out2layernum_and_pos(t.tolist())
        forest_cases.append({"latex": latex, "input_codes": LM.tgt2muti_label(t.tolist()),
                             "levels": lv, "positions": ps})

    inputs = {"img": img, "img_mask": mask, "tgt": tgt, "out": out, "codes": codes, "levels": levels,
              "positions": positions}
    golden = {**{f"input.{k}": v for k, v in inputs.items()}, **g1}
    C.save_tensors(golden, str(out_dir / "golden.safetensors"), {"model": "posformer", "note": "see meta.json"})
    for i, a in enumerate(raw):
        C.save_png(a, str(out_dir / f"image{i}.png"))
    shutil.copyfile(dictionary, out_dir / "dictionary.txt")

    def latex(seq):
        return " ".join(vocab.idx2word[int(i)] for i in seq)

    meta = {
        "model": "PosFormer",
        "repo": "SJTU-DeepVisionLab/PosFormer",
        "commit": args.commit,
        "dictionary_source": "Pos_Former/datamodule/dictionary.txt of the repository",
        "official_class": "Pos_Former.lit_posformer.LitPosFormer (inner Pos_Former.model.posformer.PosFormer at "
                          "'model': encoder, decoder, posdecoder)",
        "official_default_config": official_hp,
        "official_default_parameter_count": full_counts,
        "config": hp,
        "reduced": REDUCED,
        "parameter_count": counts,
        "cpu_change": "torch.Tensor.cuda returns the tensor (the official forward calls .cuda() on its codes)",
        "weights": {"file": "state_dict.safetensors", "key_prefix": "model.", "dtype": "float32",
                    "provenance": f"torch.manual_seed(0), LitPosFormer(**config) (default PyTorch init), then "
                                  f"{FIT_STEPS} Adam steps (lr {FIT_LR}, grad-clip 5, train mode, seed 1234) on the "
                                  "two fixture images with the official training loss "
                                  "(CE + 0.25 CE_level + 0.25 CE_pos) / 1.5. Not a trained model.",
                    "fit_loss_first_last": [losses[0], losses[-1]]},
        "vocabulary": {"size": len(vocab), "special_ids": {"PAD_IDX": 0, "SOS_IDX": 1, "EOS_IDX": 2},
                       "construction": "<pad>, <sos>, <eos>, then dictionary.txt in file order"},
        "samples": [{**s, "image_file": f"image{i}.png", "hw": list(raw[i].shape), "token_ids": indices[i]}
                    for i, s in enumerate(C.FIXTURE_SAMPLES)],
        "forest_cases": forest_cases,
        "golden_description": {
            "input.tgt / input.out": "to_bi_tgt_out: [2b, L+1], L2R rows then R2L rows, <pad>=0 padded",
            "input.codes": "label_make_muti.tgt2muti_label(tgt): [2b, L+1, 5] position decoder input",
            "input.levels / input.positions": "label_make_muti.out2layernum_and_pos(tgt): [2b, L+1] targets",
            "enc_feature / enc_mask": "model.encoder(img, img_mask)",
            "logits / level_logits / pos_logits": "PosFormer.forward(img, img_mask, tgt): [2b, L+1, V], [.., 5], "
                                                  "[.., 6]",
            "loss_*": "official ce_loss_all terms of training_step and its total, in eval mode",
            "beam_*": "approximate_joint_search on the padded batch (main decoder only): best hyp per image and its "
                      "score; pass1 = the 2*b*beam hyps and scores before rescoring; rescore_raw = _rate output",
            "beam_single{i}_*": "approximate_joint_search on image i alone (all-False mask)",
        },
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
