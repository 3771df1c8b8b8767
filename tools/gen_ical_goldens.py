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

The official code is imported at run time only; nothing of it is in this project. The steps shared with the
TAMER and PosFormer generators are in ``tools/golden_common.py``.

usage (from the project root)::

    python tools/gen_ical_goldens.py --repo /path/ICAL --dictionary /path/TAMER/lightning_logs/version_0/dictionary.txt \\
        [--commit SHA] [--shared ../shared] [--out tests/goldens/ical]

``--repo`` defaults to $HMER_REF_ICAL, ``--shared`` to $HMERZOO_SHARED or ../shared beside the project root.
tests/test_ical.py converts the weights with ``hmerzoo convert ical`` and compares with these files.
"""
from __future__ import annotations

import os

import torch

import golden_common as GC  # tools/ is on sys.path when this file is run as a script

REDUCED = {"d_model": 32, "growth_rate": 8, "num_layers": 4, "nhead": 8, "num_decoder_layers": 3,
           "dim_feedforward": 64, "dropout": 0.3, "dc": 8, "cross_coverage": True, "self_coverage": True}
FIT_STEPS, FIT_LR = 150, 2e-3


def main() -> None:
    args = GC.parse_args(
        __doc__, name="ical", package="ical", repo_env="HMER_REF_ICAL", repo_slug="qingzhenduyu/ICAL",
        commit="b7fb63640c5b37ac7e9f56f7abc9471a66fd6b6c",
        extra=lambda p: p.add_argument("--dictionary", required=True,
                                       help="ICAL's CROHME dictionary.txt (TAMER lightning_logs/version_0)"))
    C, out_dir = GC.load_fixture_helpers(args)

    from ical.datamodule import vocab
    from ical.datamodule import datamodule as dmm
    from ical.lit_ical import LitICAL
    from ical.utils import utils as U
    from torchvision.transforms import ToTensor  # the stub, torchvision's semantics

    vocab.init(args.dictionary)
    official_hp = GC.official_model_config(os.path.join(args.repo, "config", "crohme.yaml"))
    full_counts = GC.count_official_default(C, LitICAL, official_hp)

    hp = {**official_hp, **REDUCED}
    fx = GC.fixture_batch(C, args.shared, vocab, dmm.collate_fn, ToTensor())
    tens, indices, img, mask = fx.tens, fx.indices, fx.img, fx.mask
    assert fx.batch.indices == indices
    tgt, out = U.plicit_tgt_out(indices, torch.device("cpu"))
    _, imp_out = U.plicit_tgt_out(indices, torch.device("cpu"), is_implicit=True)

    def official_losses(lit, x, m):
        exp_hat, imp_hat, fusion_hat = lit(x, m, tgt)
        return {"exp": U.ce_loss(exp_hat, out),
                "implicit": U.ce_loss(imp_hat, imp_out, need_weight=lit.hparams.dynamic_weight),
                "fusion": U.ce_loss(fusion_hat, out)}

    counts, losses, build_loaded = GC.fit_and_save(
        C, LitICAL, hp, lambda lit: sum(official_losses(lit, img, mask).values()), out_dir, FIT_STEPS, FIT_LR)

    def run(lm):
        g = {}
        inner = lm.ical_model
        with torch.no_grad():
            g["enc_feature"], g["enc_mask"] = inner.encoder(img, mask)
            g["logits_exp"], g["logits_imp"], g["logits_fusion"] = lm(img, mask, tgt)
            for k, v in official_losses(lm, img, mask).items():
                g[f"loss_{k}"] = v.reshape(())
            g.update(GC.beam_goldens(lm, inner.decoder, img, mask, tens))
        return g

    g1, rerun = GC.record_twice(C, run, build_loaded)

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
    GC.save_goldens(C, out_dir, "ical", inputs, g1, fx.raw, args.dictionary)

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
        "samples": GC.sample_records(C, fx),
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
        "beam_search_result": GC.beam_search_result(g1, vocab.idx2word),
        "tolerances": {"rerun_same_process_max_abs_diff": rerun},
        "environment": C.env_info(),
    }
    GC.write_meta(C, out_dir, meta)


if __name__ == "__main__":
    main()
