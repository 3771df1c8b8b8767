"""Generate the CAN parity goldens in tests/goldens/can/ by running the OFFICIAL code (LBH1024/CAN) on the CPU.

What it does:

1. exports nothing itself: ``--repo`` (or ``$HMER_REF_CAN``) is a tree of the official repository (e.g.
   ``git archive 89ba5e3a | tar -x -C DIR``); its .py files are imported at run time, never copied into hmerzoo;
2. counts the parameters of the official default configuration (``config.yaml``, 111 classes as its
   ``words_dict.txt``) with the unmodified files, in a subprocess;
3. builds a REDUCED configuration of the same code for the committed fixture. The official files hard-code a few
   sizes (16 bottlenecks per dense block, 512 counting and coverage channels, a 256-feature position encoding, so
   attention_dim 512); a copy of the tree is made in a temporary directory with exactly these literals replaced
   (listed in meta.json, ``reduced_patches``), and nothing else changed;
4. ``torch.manual_seed(0)``, ``models.can.CAN(params)``, then a short Adam "calibration" on the two fixture images
   in train mode on the official loss (``word_loss + counting_loss`` as training.py adds them) so BatchNorm
   statistics and outputs are not trivial;
5. saves the weights with the official key names (what ``save_checkpoint`` stores under ``'model'``), reloads them
   into a fresh official model, and records in eval mode: the DenseNet features, both counting branches and their
   mean, the counting maps, the teacher-forced logits and attention of ``CAN.forward``, the official losses, and
   the greedy decoding of the official ``models/infer_model.Inference`` on each image alone (CAN's only decoding).

The vocabulary: CAN's ``words_dict.txt`` (one token per line, line number = id, ``eos`` 0, ``sos`` 1) is not in its
repository; the fixture uses a dictionary in that format built from CROHME's symbols with the structural tokens
``^ _ { }`` at ids 107-110, the ids ``counting_utils.gen_counting_label`` leaves out (with eos 0 and sos 1).

Stand-ins: ``../shared/fixtures/parity/tools/stubs`` (cv2, ...) and ``tools/can_stubs`` (thop, imported and unused
by ``models/densenet.py``).

    python tools/gen_can_goldens.py --repo /path/to/CAN --commit 89ba5e3a... [--shared ../shared]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAMPLES = [("image0_UN19_1041_em_595.png", r"x ^ { 2 } = \sum \limits _ { a = 1 } ^ { 3 } x _ { a } ^ { 2 }"),
           ("image1_18_em_1.png", r"\sqrt { 4 8 }")]
STRUCTURAL = ["^", "_", "{", "}"]  # ids 107..110 of the fixture dictionary
REDUCED = {"growthRate": 8, "nDenseBlocks": 4, "counting_channels": 64, "coverage_channels": 32,
           "attention_dim": 64, "hidden_size": 32, "input_size": 32}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=os.environ.get("HMER_REF_CAN"), help="official LBH1024/CAN tree")
    p.add_argument("--commit", default=os.environ.get("HMER_REF_CAN_COMMIT", "unknown"))
    p.add_argument("--shared", default=os.environ.get("HMERZOO_SHARED", os.path.join(ROOT, "..", "shared")))
    p.add_argument("--out", default=os.path.join(ROOT, "tests", "goldens", "can"))
    p.add_argument("--fit-steps", type=int, default=80)
    p.add_argument("--fit-lr", type=float, default=3e-3)
    return p.parse_args()


def dictionary_tokens(shared: str) -> list[str]:
    with open(os.path.join(shared, "data", "crohme", "dictionary.txt"), encoding="utf-8") as f:
        crohme = [t.strip() for t in f if t.strip()]
    body = [t for t in crohme if t not in STRUCTURAL and t != r"\Pi"]  # 105 symbols: CAN has 111 classes
    return ["eos", "sos", *body, *STRUCTURAL]


def patched_tree(repo: str, dest: str) -> dict:
    """Copy the official .py/.yaml files and replace the hard-coded sizes by the reduced ones; returns the patches."""
    for dirpath, _, files in os.walk(repo):
        if ".git" in dirpath:
            continue
        for name in files:
            if name.endswith((".py", ".yaml")):
                rel = os.path.relpath(os.path.join(dirpath, name), repo)
                os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
                shutil.copy(os.path.join(dirpath, name), os.path.join(dest, rel))
    r = REDUCED
    patches = {
        "models/densenet.py": [("nDenseBlocks = 16", f"nDenseBlocks = {r['nDenseBlocks']}")],
        "models/counting.py": [("512", str(r["counting_channels"]))],
        "models/attention.py": [("512", str(r["coverage_channels"]))],
        "models/decoder.py": [("PositionEmbeddingSine(256,", f"PositionEmbeddingSine({r['attention_dim'] // 2},")],
        "models/infer_model.py": [("PositionEmbeddingSine(256,", f"PositionEmbeddingSine({r['attention_dim'] // 2},")],
    }
    for rel, subs in patches.items():
        path = os.path.join(dest, rel)
        text = open(path, encoding="utf-8").read()
        for old, new in subs:
            if old not in text:
                raise SystemExit(f"{rel}: '{old}' not found; is this the official tree at commit 89ba5e3a?")
            text = text.replace(old, new)
        open(path, "w", encoding="utf-8").write(text)
    return {rel: [f"{old!r} -> {new!r} (every occurrence)" for old, new in subs] for rel, subs in patches.items()}


def official_params(words_path: str, reduced: bool) -> dict:
    import yaml

    with open("config.yaml", encoding="utf-8") as f:
        params = yaml.safe_load(f)
    params["device"] = torch.device("cpu")
    params["word_path"] = words_path
    params["word_num"] = 111
    params["use_label_mask"] = params.get("use_label_mask", False)
    if reduced:
        params["densenet"]["growthRate"] = REDUCED["growthRate"]
        g, n = REDUCED["growthRate"], REDUCED["nDenseBlocks"]
        c = 2 * g + n * g
        c = c // 2 + n * g
        c = c // 2 + n * g
        params["encoder"]["out_channel"] = c
        params["counting_decoder"]["in_channel"] = c
        params["attention"]["attention_dim"] = REDUCED["attention_dim"]
        params["decoder"]["hidden_size"] = REDUCED["hidden_size"]
        params["decoder"]["input_size"] = REDUCED["input_size"]
    return params


FULL_COUNT = """
import sys, torch, yaml
sys.path[:0] = {paths!r}
from models.can import CAN
params = yaml.safe_load(open('config.yaml'))
params.update(device=torch.device('cpu'), word_num=111, use_label_mask=False)
m = CAN(params)
print(sum(p.numel() for p in m.parameters()), sum(b.numel() for b in m.buffers()))
"""


def main() -> None:
    args = parse()
    if not args.repo or not os.path.isdir(args.repo):
        raise SystemExit("--repo (or $HMER_REF_CAN) must be a tree of the official LBH1024/CAN repository")
    repo = os.path.abspath(args.repo)
    stubs = [os.path.join(os.path.abspath(args.shared), "fixtures", "parity", "tools", "stubs"),
             os.path.join(HERE, "can_stubs")]
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    tokens = dictionary_tokens(args.shared)
    assert len(tokens) == 111 and tokens.index("^") == 107
    words_path = os.path.join(args.out, "words_dict.txt")
    with open(words_path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")

    # the full default configuration, unmodified files, own process (its 'models' package differs)
    out = subprocess.run([sys.executable, "-c", FULL_COUNT.format(paths=[repo, *stubs])], cwd=repo, check=True,
                         capture_output=True, text=True).stdout.split()
    full_params, full_buffers = int(out[0]), int(out[1])
    print("full default configuration:", full_params, "parameters")

    tmp = tempfile.mkdtemp()
    patches = patched_tree(repo, tmp)
    sys.path[:0] = [tmp, *stubs]
    os.chdir(tmp)
    from models.can import CAN  # noqa: E402  (the patched official code)
    from models.infer_model import Inference  # noqa: E402
    from safetensors.torch import load_file, save_file  # noqa: E402
    from PIL import Image  # noqa: E402

    params = official_params(words_path, reduced=True)
    shared_fx = os.path.join(args.shared, "fixtures", "parity", "abm")
    word_id = {t: i for i, t in enumerate(tokens)}
    images, labels = [], []
    for name, label in SAMPLES:
        arr = np.array(Image.open(os.path.join(shared_fx, name)), dtype=np.uint8)
        shutil.copyfile(os.path.join(shared_fx, name), os.path.join(args.out, name))
        # the official pkl holds black ink on white and dataset.py feeds (255 - img) / 255: white ink on black,
        # which is what these PNGs already are
        images.append(torch.tensor(arr, dtype=torch.float32)[None] / 255)
        labels.append(torch.tensor([word_id[t] for t in label.split()] + [word_id["eos"]]))
    from dataset import collate_fn  # noqa: E402  (official padding: zeros, mask 1 = valid)
    x, x_mask, y, y_mask = collate_fn(list(zip(images, labels)))

    torch.manual_seed(0)
    model = CAN(params)
    opt = torch.optim.Adam(model.parameters(), lr=args.fit_lr)
    torch.manual_seed(1234)
    model.train()
    fit_losses = []
    for step in range(args.fit_steps):
        opt.zero_grad()
        _, _, word_loss, counting_loss = model(x, x_mask, y, y_mask)
        loss = word_loss + counting_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
        fit_losses.append(float(loss))
        if step % 20 == 0 or step == args.fit_steps - 1:
            print(f"fit {step}: {float(loss):.4f} (word {float(word_loss):.4f}, counting {float(counting_loss):.4f})")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, "state_dict.safetensors"))

    fresh = CAN(params)
    fresh.load_state_dict(load_file(os.path.join(args.out, "state_dict.safetensors")))
    fresh.eval()
    # the mask and the single images are not stored: they follow from input.images and the PNGs (size limit)
    golden: dict[str, torch.Tensor] = {"input.images": x, "input.labels": y, "input.labels_mask": y_mask}
    with torch.no_grad():
        feats = fresh.encoder(x)
        mask = x_mask[:, :, ::16, ::16]
        c1, m1 = fresh.counting_decoder1(feats, mask)
        c2, m2 = fresh.counting_decoder2(feats, mask)
        probs, counting, word_loss, counting_loss = fresh(x, x_mask, y, y_mask, is_train=True)
        _, alphas = fresh.decoder(feats, y, counting, x_mask, y_mask, is_train=True)
    golden.update({"features": feats, "counting1": c1, "counting2": c2, "counting": counting,
                   "counting_maps1": m1, "logits": probs, "alphas": alphas,
                   "word_loss": word_loss.reshape(()), "counting_loss": counting_loss.reshape(())})

    infer = Inference(params)
    missing = infer.load_state_dict(load_file(os.path.join(args.out, "state_dict.safetensors")), strict=True)
    infer.eval()
    greedy = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        with torch.no_grad():
            ids, _, mae, mse = infer(img[None], lab[None], name=f"image{i}")
            single_feats = infer.encoder(img[None])
            s1, _ = infer.counting_decoder1(single_feats, None)
            s2, _ = infer.counting_decoder2(single_feats, None)
            probs_i, counting_i, _, _ = fresh(img[None], torch.ones_like(img[None]), lab[None],
                                               torch.ones(1, len(lab)), is_train=True)
        seq = [int(t) for t in ids]
        greedy.append(seq)
        golden[f"single{i}.features"] = single_feats
        golden[f"single{i}.counting"] = (s1 + s2) / 2
        golden[f"single{i}.logits"] = probs_i
        golden[f"greedy{i}"] = torch.tensor(seq, dtype=torch.long)
    golden = {k: v.detach().contiguous() for k, v in golden.items()}
    save_file(golden, os.path.join(args.out, "golden.safetensors"))

    meta = {
        "model": "CAN (Li et al., ECCV 2022), its default AttDecoder (CAN-DWAP)",
        "repo": "LBH1024/CAN", "commit": args.commit,
        "official_classes": {"training": "models.can.CAN(params)", "decoding": "models.infer_model.Inference(params)"},
        "checkpoint_layout": "utils.save_checkpoint: torch.save({'model': model.state_dict()}, '...pth'); the keys "
                             "here are that state dict's (encoder.*, counting_decoder1.*, counting_decoder2.*, "
                             "decoder.*)",
        "full_default_configuration": {"source": "config.yaml with word_num 111 (words_dict.txt)",
                                       "parameters": full_params, "buffer_elements": full_buffers},
        "reduced_configuration": {**REDUCED, "encoder_out_channel": params["encoder"]["out_channel"],
                                  "word_num": 111, "dropout_ratio": params["dropout_ratio"]},
        "reduced_patches": patches,
        "reduced_parameters": sum(p.numel() for p in fresh.parameters()),
        "dictionary": "words_dict.txt (CAN's format: one token per line, id = line number; eos 0, sos 1; the "
                      "structural ^ _ { } at 107-110, which gen_counting_label ignores together with 0 and 1)",
        "samples": [{"image": n, "label": lab} for n, lab in SAMPLES],
        "preprocessing": "image / 255 (white ink on black); batch by the official dataset.collate_fn (zero padding, "
                         "float mask 1 = valid over each image's h x w, not stored); labels get 'eos' appended, padded with 0 (eos)",
        "calibration": {"seed_init": 0, "seed_fit": 1234, "optimizer": "Adam", "lr": args.fit_lr,
                        "steps": args.fit_steps, "clip": 100.0, "mode": "train",
                        "loss": "word_loss + counting_loss (CAN.forward, as training.py)",
                        "loss_first_last": [fit_losses[0], fit_losses[-1]]},
        "golden_description": {
            "features": "fresh.encoder(input.images) [b,C,h,w]",
            "counting1/counting2/counting": "counting_decoder1/2 (kernels 3/5) on the features with the mask "
                                            "images_mask[:, :, ::16, ::16], and their mean (what the decoder reads)",
            "counting_maps1": "the per-position counting maps of branch 1 (kernel 3) [b,111,h,w]",
            "logits": "CAN.forward(..., is_train=True) in eval mode: teacher-forced word logits [b,T,111]; T "
                      "includes the appended eos; padded positions included (their input is eos)",
            "alphas": "the decoder's attention maps [b,T,h,w]",
            "word_loss/counting_loss": "CAN.forward's two loss terms (use_label_mask False: CE mean over every "
                                       "position of the padded batch; counting: 3 SmoothL1 terms)",
            "single{i}.*": "image i alone (unpadded, the PNG / 255): features, counting (Inference path, mask None), "
                           "teacher-forced logits",
            "greedy{i}": "Inference.forward on image i alone: the token ids it returns (greedy argmax, stops at "
                         "eos = 0, which is not included; at most 200 steps)",
        },
        "greedy": [{"ids": g, "latex": " ".join(tokens[t] for t in g)} for g in greedy],
        "decoding": "the official inference.py/infer_model.py decodes greedily, one image at a time; there is no "
                    "beam search in the official code",
        "env": {"python": sys.version.split()[0], "torch": torch.__version__, "threads": 2},
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(args.out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    shutil.rmtree(tmp)
    print(json.dumps(meta["greedy"], indent=1))


if __name__ == "__main__":
    main()
