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

The official code is imported at run time only; nothing of it is in this project. The steps shared with the
ICAL and TAMER generators are in ``tools/golden_common.py``.

usage (from the project root)::

    python tools/gen_posformer_goldens.py --repo /path/PosFormer [--commit SHA] [--shared ../shared]
"""
from __future__ import annotations

import os

import torch

import golden_common as GC  # tools/ is on sys.path when this file is run as a script

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
    args = GC.parse_args(__doc__, name="posformer", package="Pos_Former", repo_env="HMER_REF_POSFORMER",
                         repo_slug="SJTU-DeepVisionLab/PosFormer", commit="082ff9f8d24eb2138403bb10277a344b2615f6b9")
    C, out_dir = GC.load_fixture_helpers(args)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official forward calls .cuda(); CPU run

    from Pos_Former.datamodule import datamodule as dmm
    from Pos_Former.datamodule import label_make_muti as LM
    from Pos_Former.datamodule import vocab
    from Pos_Former.lit_posformer import LitPosFormer
    from Pos_Former.utils import utils as U
    from torchvision.transforms import ToTensor  # the stub, torchvision's semantics

    dictionary = os.path.join(args.repo, "Pos_Former", "datamodule", "dictionary.txt")
    official_hp = GC.official_model_config(os.path.join(args.repo, "config.yaml"))
    full_counts = GC.count_official_default(C, LitPosFormer, official_hp)

    hp = {**official_hp, **REDUCED}
    fx = GC.fixture_batch(C, args.shared, vocab, dmm.collate_fn, ToTensor())
    img, mask = fx.img, fx.mask
    tgt, out = U.to_bi_tgt_out(fx.indices, torch.device("cpu"))
    codes = torch.tensor(LM.tgt2muti_label(tgt.tolist()), dtype=torch.float32)
    levels, positions = (torch.tensor(x, dtype=torch.long) for x in LM.out2layernum_and_pos(tgt.tolist()))

    def official_losses(lit):
        out_hat, out_layer, out_pos = lit.model(img, mask, tgt, None)
        ce, layer, pos = U.ce_loss_all(out_hat, out, out_layer, levels, out_pos, positions)
        return {"ce": ce, "layer": layer, "pos": pos, "total": (ce + 0.25 * layer + 0.25 * pos) / 1.5}

    counts, losses, build_loaded = GC.fit_and_save(
        C, LitPosFormer, hp, lambda lit: official_losses(lit)["total"], out_dir, FIT_STEPS, FIT_LR)

    def run(lm):
        g = {}
        inner = lm.model
        with torch.no_grad():
            g["enc_feature"], g["enc_mask"] = inner.encoder(img, mask)
            g["logits"], g["level_logits"], g["pos_logits"] = inner(img, mask, tgt, None)
            for k, v in official_losses(lm).items():
                g[f"loss_{k}"] = v.reshape(())
            g.update(GC.beam_goldens(lm, inner.decoder, img, mask, fx.tens))
        return g

    g1, rerun = GC.record_twice(C, run, build_loaded)

    forest_cases = []
    for latex in FOREST_CASES:
        ids = vocab.words2indices(latex.split())
        t, _ = U.to_bi_tgt_out([ids], torch.device("cpu"))
        lv, ps = LM.out2layernum_and_pos(t.tolist())
        forest_cases.append({"latex": latex, "input_codes": LM.tgt2muti_label(t.tolist()),
                             "levels": lv, "positions": ps})

    inputs = {"img": img, "img_mask": mask, "tgt": tgt, "out": out, "codes": codes, "levels": levels,
              "positions": positions}
    GC.save_goldens(C, out_dir, "posformer", inputs, g1, fx.raw, dictionary)

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
        "samples": GC.sample_records(C, fx),
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
        "beam_search_result": GC.beam_search_result(g1, vocab.idx2word),
        "tolerances": {"rerun_same_process_max_abs_diff": rerun},
        "environment": C.env_info(),
    }
    GC.write_meta(C, out_dir, meta)


if __name__ == "__main__":
    main()
