"""Steps shared by the generators of the ICAL, TAMER and PosFormer parity goldens (tools/gen_*_goldens.py).

The three official code bases descend from CoMER and expose the same surface: a Lightning module whose
``approximate_joint_search`` runs a bidirectional beam search through ``decoder._beam_search`` (first pass) and
``decoder._rate`` (opposite-direction rescoring), a ``collate_fn`` batch with ``imgs``/``mask``, and a ``vocab``
with ``words2indices``/``idx2word``. The generators differ in the configuration, the training loss and the extra
tensors they record; everything else (command line, fixture batch, calibration fit, beam-search capture, output
files) lives here so that it is written once. ``C`` below is the ``common`` module of
``<shared>/fixtures/parity/tools`` (fit, save, count_params, ...), returned by :func:`load_fixture_helpers`.

Nothing here changes what the generators compute: each step keeps the order of seeding and calls it had inline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(doc: str, *, name: str, package: str, repo_env: str, repo_slug: str, commit: str,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Read ``--repo --commit [extra] --shared --out`` and check that ``--repo`` holds the official ``package``.

    ``name`` is the goldens folder under tests/goldens (the default ``--out``); ``extra`` may add arguments of one
    generator only (ICAL's ``--dictionary``).
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repo", default=os.environ.get(repo_env), help=f"exported tree of {repo_slug}")
    p.add_argument("--commit", default=commit)
    if extra is not None:
        extra(p)
    p.add_argument("--shared", default=os.environ.get("HMERZOO_SHARED", str(ROOT.parent / "shared")))
    p.add_argument("--out", default=str(ROOT / "tests" / "goldens" / name))
    args = p.parse_args()
    if not args.repo or not os.path.isdir(os.path.join(args.repo, package)):
        raise SystemExit(f"--repo (or ${repo_env}) must point to an exported tree of {repo_slug}")
    return args


def load_fixture_helpers(args: argparse.Namespace):
    """Import the shared fixture helpers, make the official tree importable (with the stand-in packages for
    pytorch_lightning, torchmetrics, torchvision.transforms and cv2) and create the output folder.

    Returns ``(C, out_dir)``.
    """
    sys.path.insert(0, os.path.join(args.shared, "fixtures", "parity", "tools"))
    import common as C  # lives in the shared fixtures, found only once the path above is set

    C.setup_imports(args.repo)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return C, out_dir


def official_model_config(path: str) -> dict:
    """The ``model`` section of an official YAML configuration file."""
    import yaml  # only the generators need it, after the stand-ins are in place

    with open(path) as f:
        return dict(yaml.safe_load(f)["model"])


def count_official_default(C, lit_cls, official_hp: dict) -> dict:
    """Parameter counts of the official default configuration (built seeded, only to be counted)."""
    torch.manual_seed(0)
    counts = C.count_params(lit_cls(**official_hp))
    print("official default parameters:", counts)
    return counts


def fixture_batch(C, shared: str, vocab, collate_fn, to_tensor) -> SimpleNamespace:
    """The two CoMER parity fixture images and captions as the official data module batches them.

    Fields: ``raw`` (uint8 arrays), ``tens`` (one tensor per image), ``words``, ``indices`` (token ids per caption),
    ``batch`` (the official collate result), ``img`` and ``mask`` (its padded images and padding mask).
    """
    images = sorted((Path(shared) / "fixtures" / "parity" / "comer").glob("image*.png"))
    raw = [C.load_gray_u8(str(pth)) for pth in images]
    tens = [to_tensor(a) for a in raw]
    words = [s["label"].split() for s in C.FIXTURE_SAMPLES]
    indices = [vocab.words2indices(w) for w in words]
    batch = collate_fn([([s["name"] for s in C.FIXTURE_SAMPLES], tens, words)])
    return SimpleNamespace(raw=raw, tens=tens, words=words, indices=indices, batch=batch,
                           img=batch.imgs, mask=batch.mask)


def fit_and_save(C, lit_cls, hp: dict, total_loss: Callable, out_dir: Path, steps: int, lr: float):
    """Build the reduced model seeded, calibrate it with ``steps`` Adam steps on ``total_loss(model)`` and save its
    state_dict as ``out_dir/state_dict.safetensors`` (official key names).

    Returns ``(parameter_counts, fit_losses, build_loaded)``; ``build_loaded()`` makes a fresh official model in
    eval mode holding the saved weights (its own initialisation, seeded differently, is fully overwritten).
    """
    torch.manual_seed(0)
    lit = lit_cls(**hp)
    counts = C.count_params(lit)
    losses = C.fit(lit, lambda: total_loss(lit), steps, lr)
    lit.eval()
    sd_path = out_dir / "state_dict.safetensors"
    C.save_state_dict(lit.state_dict(), str(sd_path), False)

    def build_loaded():
        torch.manual_seed(12345)
        m = lit_cls(**hp)
        m.load_state_dict(C.load_state_dict(str(sd_path)), strict=True)
        return m.eval()

    return counts, losses, build_loaded


def _padded(seqs, pad: int) -> torch.Tensor:
    """Token sequences as one [n, pad] long tensor, -1 after each sequence's end."""
    t = torch.full((len(seqs), pad), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        t[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return t


def beam_goldens(lit, decoder, img: torch.Tensor, mask: torch.Tensor, tens) -> dict:
    """Run the official ``lit.approximate_joint_search`` on the padded batch and on each image alone.

    While the batched search runs, ``decoder._beam_search`` and ``decoder._rate`` are wrapped to keep copies of the
    first-pass hypotheses and scores and of the raw rescoring output, then restored. Returned tensors:
    ``beam_tokens`` / ``beam_lengths`` / ``beam_scores`` (best hypothesis per image, -1 padded),
    ``beam_pass1_tokens`` / ``beam_pass1_lengths`` / ``beam_pass1_scores`` (all first-pass hypotheses),
    ``beam_rescore_raw`` and, per image i, ``beam_single{i}_tokens`` / ``beam_single{i}_score`` (all-False mask).
    """
    g = {}
    rec = {}
    orig_bs, orig_rate = decoder._beam_search, decoder._rate

    def spy_bs(*a, **k):
        r = orig_bs(*a, **k)
        rec["hyps"], rec["scores"] = [h.clone() for h in r[0]], r[1].clone()
        return r

    def spy_rate(*a, **k):
        r = orig_rate(*a, **k)
        rec["rev"] = r.clone()
        return r

    with torch.no_grad():
        decoder._beam_search, decoder._rate = spy_bs, spy_rate
        try:
            hyps = lit.approximate_joint_search(img, mask)
        finally:
            decoder._beam_search, decoder._rate = orig_bs, orig_rate
        # one width for the final and the first-pass tokens
        pad = max([len(h.seq) for h in hyps] + [len(h) for h in rec["hyps"]] + [1])
        g["beam_tokens"] = _padded([h.seq for h in hyps], pad)
        g["beam_lengths"] = torch.tensor([len(h.seq) for h in hyps])
        g["beam_scores"] = torch.stack([torch.as_tensor(h.score, dtype=torch.float32) for h in hyps])
        g["beam_pass1_tokens"] = _padded(rec["hyps"], pad)
        g["beam_pass1_lengths"] = torch.tensor([len(h) for h in rec["hyps"]])
        g["beam_pass1_scores"] = rec["scores"]
        g["beam_rescore_raw"] = rec["rev"]
        for i, t in enumerate(tens):
            hs = lit.approximate_joint_search(t.unsqueeze(0), torch.zeros_like(t, dtype=torch.bool))
            g[f"beam_single{i}_tokens"] = torch.tensor(hs[0].seq, dtype=torch.long)
            g[f"beam_single{i}_score"] = torch.as_tensor(hs[0].score, dtype=torch.float32).reshape(1)
    return g


def record_twice(C, run: Callable, build_loaded: Callable):
    """``run`` on two freshly loaded models: the first result and the largest difference between the two runs."""
    g1 = run(build_loaded())
    g2 = run(build_loaded())
    return g1, C.max_abs_diff(g1, g2)


def save_goldens(C, out_dir: Path, model: str, inputs: dict, recorded: dict, raw, dictionary: str) -> None:
    """Write ``golden.safetensors`` (inputs under ``input.``, then the recorded tensors), the fixture images as
    ``image{i}.png`` and a copy of the dictionary the vocabulary was built from."""
    golden = {**{f"input.{k}": v for k, v in inputs.items()}, **recorded}
    C.save_tensors(golden, str(out_dir / "golden.safetensors"), {"model": model, "note": "see meta.json"})
    for i, a in enumerate(raw):
        C.save_png(a, str(out_dir / f"image{i}.png"))
    shutil.copyfile(dictionary, out_dir / "dictionary.txt")


def sample_records(C, fx: SimpleNamespace) -> list:
    """meta.json's ``samples``: each fixture sample with its image file, size and token ids."""
    return [{**s, "image_file": f"image{i}.png", "hw": list(fx.raw[i].shape), "token_ids": fx.indices[i]}
            for i, s in enumerate(C.FIXTURE_SAMPLES)]


def beam_search_result(g: dict, idx2word) -> dict:
    """meta.json's ``beam_search_result``: the recorded best hypotheses as token ids, LaTeX and score."""
    def latex(seq):
        return " ".join(idx2word[int(i)] for i in seq)

    n = len(g["beam_lengths"])
    batched = []
    for i in range(n):
        toks = g["beam_tokens"][i, :int(g["beam_lengths"][i])]
        batched.append({"tokens": toks.tolist(), "latex": latex(toks), "score": float(g["beam_scores"][i])})
    single = [{"tokens": g[f"beam_single{i}_tokens"].tolist(), "latex": latex(g[f"beam_single{i}_tokens"]),
               "score": float(g[f"beam_single{i}_score"])} for i in range(n)]
    return {"batched": batched, "single": single}


def write_meta(C, out_dir: Path, meta: dict, *also_print) -> None:
    """Write meta.json and print the beam-search result, anything in ``also_print`` (as JSON) and the file sizes."""
    C.write_json(meta, str(out_dir / "meta.json"))
    print(json.dumps(meta["beam_search_result"], indent=1))
    for x in also_print:
        print(json.dumps(x))
    print("sizes:", C.file_sizes(str(out_dir)))
