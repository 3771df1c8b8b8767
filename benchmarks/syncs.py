"""Host syncs and blocking copies per training step, per validation greedy step and per beam-search step.

    python benchmarks/syncs.py [RECIPE ...] [--sites] [--data ROOT] [--batch 4] [--max-len 12]

Default: every shipped recipe in recipes/. Each model is built from its recipe with tiny sizes (CPU is enough: a
host sync is a Python-visible call, counted by :class:`hmerzoo.host_syncs.HostSyncCounter` on any device) and run on
the ``--batch`` smallest CROHME training images (train.zip or train/ under --data):

- **train step**: one ``train_step`` (forward, backward, clip, optimizer step), after one warm-up step;
- **greedy step**: ``model.greedy`` (validation's decoding) with ``--max-len`` steps, encoder included, divided by
  the decoder steps it ran;
- **beam step**: the recipe's search (``decode.mode``, beam ``--beam``) on the encoded batch (encoder not counted),
  run to ``--max-len`` and to twice that: the difference divided by the difference in decoder steps is the cost of
  one step; the rest of the shorter search (start, rescoring, final choice) is shown as "once".

The start and end tokens' logits are pushed down so every search runs all ``--max-len`` steps (an untrained model
would stop at random); per-step figures include the one-off costs (encoder, start, rescoring) spread over those
steps. ``clip_grad_norm_``'s same-device moves are not counted (no-ops on a GPU). The issue's targets: train step
<= 1, decode step <= 1, no boolean-mask indexing.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from hmerzoo.batch import Batch, pad_images  # noqa: E402
from hmerzoo.builder import build_component, build_model, vocab_from_recipe  # noqa: E402
from hmerzoo.host_syncs import HostSyncCounter  # noqa: E402
from hmerzoo.recipe import load_recipe  # noqa: E402
from hmerzoo.registry import OPTIMIZERS  # noqa: E402
from hmerzoo.runtime import seed_everything  # noqa: E402

# CPU-sized models: the sync pattern depends on the code paths, not the widths
TINY = {
    "densenet": ["model.encoder.growth_rate=8", "model.encoder.num_layers=2"],
    "transformer": ["model.neck.d_model=32", "model.decoder.d_model=32", "model.decoder.nhead=2",
                    "model.decoder.num_layers=2", "model.decoder.dim_feedforward=64"],
    "comer": ["model.decoder.dc=8"],
    "abm": ["model.decoder.hidden_size=16", "model.decoder.embed_dim=16", "model.decoder.attention_dim=16",
            "model.decoder.coverage_channels=8"],
    "can": ["model.decoder.hidden_size=16", "model.decoder.embed_dim=16", "model.decoder.attention_dim=16",
            "model.decoder.coverage_channels=8", "model.decoder.counting_channels=32"],
}
COLUMNS = ("train step", "greedy step", "beam step", "beam once", "bool-mask index")


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def decoding_recipes(names: list[str]) -> tuple[list[str], list[str]]:
    """(recipes with a decoder, the others): the caption-less pre-training stages (a ``model.type`` without a
    decoder: Mask & Match 1-2) have no decoding to count, and their tiny versions need other overrides."""
    skipped = [n for n in names if not ((load_recipe(n).get("model") or {}).get("decoder"))]
    return [n for n in names if n not in skipped], skipped


def default_data_root() -> Path:
    return Path(os.environ.get("HMERZOO_DATA") or REPO / "data" / "crohme")


def tiny_overrides(recipe: dict) -> list[str]:
    model = recipe.get("model") or {}
    decoder = (model.get("decoder") or {}).get("type")
    out = list(TINY["densenet"]) if (model.get("encoder") or {}).get("type") == "densenet" else []
    out += TINY[decoder] if decoder in ("abm", "can") else TINY["transformer"]
    out += TINY["comer"] if decoder == "comer" else []
    return out


def tiny_model(name: str, root: Path, extra: list[str] = ()) -> tuple[Any, dict]:
    """The recipe's model with tiny widths (dropout kept: its code path is part of the count)."""
    recipe = load_recipe(name, [f"data.root={root}"])
    recipe = load_recipe(name, [f"data.root={root}", *tiny_overrides(recipe), *extra])
    return build_model(recipe, validate=False), recipe


def small_batch(root: Path, recipe: dict, size: int) -> Batch:
    """The ``size`` smallest training images (by area), padded into one batch: the same pixels on every run."""
    from hmerzoo.data import CrohmeDataset

    dataset = CrohmeDataset(root, "train", vocab_from_recipe(recipe))
    order = sorted(range(len(dataset)), key=lambda i: (dataset.sizes[i][0] * dataset.sizes[i][1], i))[:size]
    images, mask = pad_images([dataset.load_image(i) for i in order])
    return Batch(images, mask, [list(dataset.samples[i].ids) for i in order], [dataset.names[i] for i in order])


class Counter(HostSyncCounter):
    """HostSyncCounter without ``clip_grad_norm_``'s per-parameter ``norm.to(device)``: a move to the device the
    norm is already on, a no-op on a GPU (counted on the CPU because the device cannot be told apart there)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        before = len(self.events)
        result = super().__torch_function__(func, types, args, kwargs)
        if len(self.events) > before and self.events[-1].kind == "blocking copy" and any(
                f.filename.endswith(os.path.join("nn", "utils", "clip_grad.py")) for f in traceback.extract_stack()):
            self.events.pop()
        return result


def counting_steps(decoder: Any, never_end: list[int] = ()) -> Callable[[], int]:
    """Wrap ``decoder.step`` (an instance attribute shadows the method) to count the steps a search runs, and
    push the ``never_end`` tokens' logits down so an untrained model decodes every step up to max_len."""
    calls = [0]
    step = decoder.step
    ends = torch.tensor(list(never_end), dtype=torch.long)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        logits, state = step(*args, **kwargs)
        if not never_end:
            return logits, state
        return logits.index_fill(-1, ends.to(logits.device, non_blocking=True), -1e4), state

    decoder.step = counted
    return lambda: calls[0]


def measure(name: str, root: Path, batch_size: int = 4, max_len: int = 12, beam: int = 3,
            extra: list[str] = ()) -> dict[str, Any]:
    """Counters (HostSyncCounter) for one train step, one greedy decode and one beam search of a recipe."""
    from hmerzoo.training import train_step

    seed_everything(0)
    model, recipe = tiny_model(name, root, extra)
    batch = small_batch(root, recipe, batch_size)
    device = torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_component(OPTIMIZERS, recipe["optim"], "optim", {"params": params})
    grad_clip = (recipe.get("train") or {}).get("grad_clip")
    model.train()
    train_step(model, batch, optimizer, params, device, "fp32", grad_clip=grad_clip, step=1)  # warm-up
    with Counter() as train:
        train_step(model, batch, optimizer, params, device, "fp32", grad_clip=grad_clip, step=2)

    model.eval()
    steps = counting_steps(model.decoder, [model.vocab.sos_id, model.vocab.eos_id])
    with torch.no_grad(), Counter() as greedy:
        model.greedy(batch.images, batch.image_mask, max_len=max_len)
    greedy_steps = steps()

    beams = beam_counts(model, recipe, batch, steps, beam, (max_len, 2 * max_len))
    return {"recipe": name, "mode": beams["mode"], "train": train, "greedy": greedy, "greedy_steps": greedy_steps,
            "beam": beams["counters"][0], "beam_steps": beams["steps"][0], "beam_per_step": beams["per_step"],
            "beam_once": beams["once"]}


def beam_counts(model: Any, recipe: dict, batch: Batch, steps: Callable[[], int], beam: int,
                lengths: tuple[int, int]) -> dict[str, Any]:
    """The recipe's search on the encoded batch (encoder not counted) with each of two ``max_len``: counters,
    decoder steps, the syncs of one step (difference / difference in steps) and those once per search.
    ``steps``: :func:`counting_steps` on the model's decoder (so every search runs to max_len)."""
    from hmerzoo.decoding.modes import search
    from hmerzoo.decoding.recognize import decode_config

    vocab = model.vocab
    counters, ran = [], []
    with torch.no_grad():
        memory, mask = model.encode(batch.images, batch.image_mask)
        for max_len in lengths:
            config = decode_config(recipe, beam_size=beam, max_len=max_len)
            before = steps()
            with Counter() as counter:
                search(model.decoder, memory, mask, config, sos_id=vocab.sos_id, eos_id=vocab.eos_id,
                       pad_id=vocab.pad_id)
            counters.append(counter)
            ran.append(steps() - before)
    per_step = (counters[1].total - counters[0].total) / max(ran[1] - ran[0], 1)
    return {"mode": config.mode, "counters": counters, "steps": ran, "per_step": per_step,
            "once": counters[0].total - per_step * ran[0]}


def row(m: dict[str, Any]) -> list[str]:
    mask_index = sum(c.count("bool-mask index") for c in (m["train"], m["greedy"], m["beam"]))
    return [m["recipe"], m["mode"], str(m["train"].total),
            f"{m['greedy'].total / max(m['greedy_steps'], 1):.1f} ({m['greedy'].total}/{m['greedy_steps']})",
            f"{m['beam_per_step']:.1f}", f"{m['beam_once']:.0f}", str(mask_index)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe names or paths (default: every shipped recipe)")
    parser.add_argument("--data", type=Path, default=None,
                        help="CROHME root with train.zip (default: $HMERZOO_DATA or the checkout's data/crohme)")
    parser.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    parser.add_argument("--max-len", type=int, default=12, help="decoding steps (default 12)")
    parser.add_argument("--beam", type=int, default=3, help="beam size (default 3)")
    parser.add_argument("--sites", type=int, nargs="?", const=8, default=0,
                        help="also print the top call sites of each count (default 8 when given)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.data or default_data_root()
    names, skipped = decoding_recipes(args.recipes or shipped_recipes())
    results = [measure(name, root, args.batch, args.max_len, args.beam) for name in names]
    if skipped:
        print(f"not measured (no decoder): {', '.join(skipped)}")

    print(f"host syncs + blocking copies (batch {args.batch}, max_len {args.max_len}, beam {args.beam}; "
          f"greedy per step: total/decoder steps; beam per step: the extra syncs of {args.max_len} more steps "
          f"per step, once: the rest of a {args.max_len}-step search)\n")
    print("| recipe | search mode | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---:|" * len(COLUMNS))
    for m in results:
        print("| " + " | ".join(row(m)) + " |")
    if args.sites:
        for m in results:
            for part in ("train", "greedy", "beam"):
                print(f"\n{m['recipe']} {part}: {m[part].summary(top=args.sites)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
