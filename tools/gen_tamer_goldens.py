"""Generate the TAMER parity goldens in tests/goldens/tamer/ by running the OFFICIAL TAMER code (qingzhenduyu/TAMER).

What it does (CPU, float32, a few minutes on 2 threads):

1. imports the official package ``tamer`` from ``--repo`` (an exported tree; only its .py/.yaml/.txt files are
   needed) with the stand-ins of ``<shared>/fixtures/parity/tools/stubs`` for pytorch_lightning, torchmetrics,
   torchvision.transforms and cv2; the vocabulary is the repository's CROHME ``lightning_logs/version_0/dictionary.txt``;
2. builds ``LitTAMER`` with the official default configuration (``config/crohme.yaml``) only to count its parameters,
   and with a REDUCED configuration (``REDUCED``) for the committed goldens: seeded (``torch.manual_seed(0)``),
   calibrated with a short Adam fit on the two fixture images with the official training loss (``CE + struct CE``);
3. saves the weights with the official key names (``state_dict.safetensors``, prefix ``tamer_model.``), reloads
   them into a fresh official model and records, in eval mode: the encoder output, the teacher-forced logits and
   structure similarities (``sim``), the struct targets (``to_struct_output``) of the captions and of a few
   hand-picked token sequences (legal and illegal), the official loss terms, and the official beam search, whose
   final choice adds the structure score and drops hypotheses whose LaTeX does not parse (``generation_utils``).

The official code is imported at run time only; nothing of it is in this project.

usage (from the project root)::

    python tools/gen_tamer_goldens.py --repo /path/TAMER [--commit SHA] [--shared ../shared] [--out tests/goldens/tamer]
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
# token sequences whose official struct targets are recorded (parse quirks included)
STRUCT_CASES = [
    r"x ^ { 2 } = \sum \limits _ { a = 1 } ^ { 3 } x _ { a } ^ { 2 }",
    r"\sqrt { 4 8 }",
    r"\frac { a + 1 } { b } - \sqrt [ 3 ] { x }",
    r"x ^ { 2 } _ { 3 }",
    r"a _ { i } ^ { 2 } \sum _ { k } ^ { n } b",
    r"\frac { a } b",
    r"x ^ { 2",
    r"x ^",
    r"\sqrt",
    r"\frac { } { }",
    r"{ a } ( b ) \{ c \}",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=os.environ.get("HMER_REF_TAMER"), help="exported tree of qingzhenduyu/TAMER")
    p.add_argument("--commit", default="2213e2a145cb1e63a58d08a493553fcedc362acb")
    p.add_argument("--shared", default=os.environ.get("HMERZOO_SHARED", str(ROOT.parent / "shared")))
    p.add_argument("--out", default=str(ROOT / "tests" / "goldens" / "tamer"))
    args = p.parse_args()
    if not args.repo or not os.path.isdir(os.path.join(args.repo, "tamer")):
        raise SystemExit("--repo (or $HMER_REF_TAMER) must point to an exported tree of qingzhenduyu/TAMER")
    sys.path.insert(0, os.path.join(args.shared, "fixtures", "parity", "tools"))
    import common as C  # the shared fixture helpers (fit, save, count_params, ...)

    C.setup_imports(args.repo)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import yaml
    from tamer.datamodule import vocab
    from tamer.datamodule import datamodule as dmm
    from tamer.lit_tamer import LitTAMER
    from tamer.utils import utils as U
    from torchvision.transforms import ToTensor  # the stub, torchvision's semantics

    dictionary = os.path.join(args.repo, "lightning_logs", "version_0", "dictionary.txt")
    vocab.init(dictionary)
    with open(os.path.join(args.repo, "config", "crohme.yaml")) as f:
        official_hp = dict(yaml.safe_load(f)["model"])
    torch.manual_seed(0)
    full_counts = C.count_params(LitTAMER(**official_hp))
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
    struct_out, _ = U.to_struct_output(indices, torch.device("cpu"))

    def official_losses(lit):
        out_hat, sim = lit(img, mask, tgt)
        return {"ce": U.ce_loss(out_hat, out), "struct": U.ce_loss(sim, struct_out, ignore_idx=-1)}

    torch.manual_seed(0)
    lit = LitTAMER(**hp)
    counts = C.count_params(lit)
    losses = C.fit(lit, lambda: sum(official_losses(lit).values()), FIT_STEPS, FIT_LR)
    lit.eval()
    sd_path = out_dir / "state_dict.safetensors"
    C.save_state_dict(lit.state_dict(), str(sd_path), False)

    def build_loaded():
        torch.manual_seed(12345)
        m = LitTAMER(**hp)
        m.load_state_dict(C.load_state_dict(str(sd_path)), strict=True)
        return m.eval()

    def run(lm):
        g = {}
        inner = lm.tamer_model
        with torch.no_grad():
            g["enc_feature"], g["enc_mask"] = inner.encoder(img, mask)
            g["logits"], g["sim"] = lm(img, mask, tgt)
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

    struct_cases = []
    for latex in STRUCT_CASES:
        ids = vocab.words2indices(latex.split())
        s_out, illegal = U.to_struct_output([ids], torch.device("cpu"))
        struct_cases.append({"latex": latex, "l2r": s_out[0].tolist(), "r2l": s_out[1].tolist(),
                             "illegal": bool(illegal[0])})

    inputs = {"img": img, "img_mask": mask, "tgt": tgt, "out": out, "struct_out": struct_out}
    golden = {**{f"input.{k}": v for k, v in inputs.items()}, **g1}
    C.save_tensors(golden, str(out_dir / "golden.safetensors"), {"model": "tamer", "note": "see meta.json"})
    for i, a in enumerate(raw):
        C.save_png(a, str(out_dir / f"image{i}.png"))
    shutil.copyfile(dictionary, out_dir / "dictionary.txt")

    def latex(seq):
        return " ".join(vocab.idx2word[int(i)] for i in seq)

    meta = {
        "model": "TAMER",
        "repo": "qingzhenduyu/TAMER",
        "commit": args.commit,
        "dictionary_source": "lightning_logs/version_0/dictionary.txt of the repository",
        "official_class": "tamer.lit_tamer.LitTAMER (inner nn.Module tamer.model.tamer.TAMER at 'tamer_model')",
        "official_default_config": official_hp,
        "official_default_parameter_count": full_counts,
        "config": hp,
        "reduced": REDUCED,
        "parameter_count": counts,
        "weights": {"file": "state_dict.safetensors", "key_prefix": "tamer_model.", "dtype": "float32",
                    "provenance": f"torch.manual_seed(0), LitTAMER(**config) (default PyTorch init), then {FIT_STEPS} "
                                  f"Adam steps (lr {FIT_LR}, grad-clip 5, train mode, seed 1234) on the two fixture "
                                  "images with the official training loss CE + struct CE. Not a trained model.",
                    "fit_loss_first_last": [losses[0], losses[-1]]},
        "vocabulary": {"size": len(vocab), "special_ids": {"PAD_IDX": 0, "SOS_IDX": 1, "EOS_IDX": 2},
                       "construction": "<pad>, <sos>, <eos>, then dictionary.txt in file order"},
        "samples": [{**s, "image_file": f"image{i}.png", "hw": list(raw[i].shape), "token_ids": indices[i]}
                    for i, s in enumerate(C.FIXTURE_SAMPLES)],
        "struct_cases": struct_cases,
        "golden_description": {
            "input.tgt / input.out": "to_bi_tgt_out: [2b, L+1], L2R rows then R2L rows, <pad>=0 padded",
            "input.struct_out": "to_struct_output: [2b, L+1] parent position per target position, -1 ignored",
            "enc_feature / enc_mask": "tamer_model.encoder(img, img_mask)",
            "logits / sim": "LitTAMER.forward(img, img_mask, tgt): [2b, L+1, V] and [2b, L+1, L+1] (keys masked -inf)",
            "loss_ce / loss_struct": "official ce_loss terms of training_step, in eval mode",
            "beam_*": "approximate_joint_search on the padded batch: best hyp per image and its score (first pass "
                      "+ opposite-direction rating + struct score, illegal -> -inf); pass1 = the 2*b*beam hyps and "
                      "scores before rescoring; rescore_raw = _rate output as computed",
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
    print(json.dumps(struct_cases))
    print("sizes:", C.file_sizes(str(out_dir)))


if __name__ == "__main__":
    main()
