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

The official code is imported at run time only; nothing of it is in this project. The steps shared with the
ICAL and PosFormer generators are in ``tools/golden_common.py``.

usage (from the project root)::

    python tools/gen_tamer_goldens.py --repo /path/TAMER [--commit SHA] [--shared ../shared] [--out tests/goldens/tamer]
"""
from __future__ import annotations

import os

import torch

import golden_common as GC  # tools/ is on sys.path when this file is run as a script

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
    args = GC.parse_args(__doc__, name="tamer", package="tamer", repo_env="HMER_REF_TAMER",
                         repo_slug="qingzhenduyu/TAMER", commit="2213e2a145cb1e63a58d08a493553fcedc362acb")
    C, out_dir = GC.load_fixture_helpers(args)

    from tamer.datamodule import vocab
    from tamer.datamodule import datamodule as dmm
    from tamer.lit_tamer import LitTAMER
    from tamer.utils import utils as U
    from torchvision.transforms import ToTensor  # the stub, torchvision's semantics

    dictionary = os.path.join(args.repo, "lightning_logs", "version_0", "dictionary.txt")
    vocab.init(dictionary)
    official_hp = GC.official_model_config(os.path.join(args.repo, "config", "crohme.yaml"))
    full_counts = GC.count_official_default(C, LitTAMER, official_hp)

    hp = {**official_hp, **REDUCED}
    fx = GC.fixture_batch(C, args.shared, vocab, dmm.collate_fn, ToTensor())
    img, mask = fx.img, fx.mask
    tgt, out = U.to_bi_tgt_out(fx.indices, torch.device("cpu"))
    struct_out, _ = U.to_struct_output(fx.indices, torch.device("cpu"))

    def official_losses(lit):
        out_hat, sim = lit(img, mask, tgt)
        return {"ce": U.ce_loss(out_hat, out), "struct": U.ce_loss(sim, struct_out, ignore_idx=-1)}

    counts, losses, build_loaded = GC.fit_and_save(
        C, LitTAMER, hp, lambda lit: sum(official_losses(lit).values()), out_dir, FIT_STEPS, FIT_LR)

    def run(lm):
        g = {}
        inner = lm.tamer_model
        with torch.no_grad():
            g["enc_feature"], g["enc_mask"] = inner.encoder(img, mask)
            g["logits"], g["sim"] = lm(img, mask, tgt)
            for k, v in official_losses(lm).items():
                g[f"loss_{k}"] = v.reshape(())
            g.update(GC.beam_goldens(lm, inner.decoder, img, mask, fx.tens))
        return g

    g1, rerun = GC.record_twice(C, run, build_loaded)

    struct_cases = []
    for latex in STRUCT_CASES:
        ids = vocab.words2indices(latex.split())
        s_out, illegal = U.to_struct_output([ids], torch.device("cpu"))
        struct_cases.append({"latex": latex, "l2r": s_out[0].tolist(), "r2l": s_out[1].tolist(),
                             "illegal": bool(illegal[0])})

    inputs = {"img": img, "img_mask": mask, "tgt": tgt, "out": out, "struct_out": struct_out}
    GC.save_goldens(C, out_dir, "tamer", inputs, g1, fx.raw, dictionary)

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
        "samples": GC.sample_records(C, fx),
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
        "beam_search_result": GC.beam_search_result(g1, vocab.idx2word),
        "tolerances": {"rerun_same_process_max_abs_diff": rerun},
        "environment": C.env_info(),
    }
    GC.write_meta(C, out_dir, meta, struct_cases)


if __name__ == "__main__":
    main()
