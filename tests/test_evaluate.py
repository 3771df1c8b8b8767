"""``hmerzoo eval``: the numbers it prints and writes agree with its predictions file, recomputed here by hand.

A stand-in model with known answers gives non-trivial rates quickly; the converted BTTR fixture model (fitted to
two images only, so its ExpRate on CROHME is 0) checks the real path: folders, zips, several splits, chunking.
A full 2014 evaluation is not part of the tests: even greedy, the untrained fixture model often decodes to max_len,
about 1 image/s on a 2-core CPU, far beyond the 2 minutes such a test may take.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import hmerzoo.builder
from hmerzoo.cli import main
from hmerzoo.data.crohme import CrohmeDataset
from hmerzoo.evaluate import RECOGNIZE_CHUNK, evaluate_split
from hmerzoo.model import Recognition
from hmerzoo.vocab import Vocabulary

SHARED = Path(os.environ.get("HMERZOO_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
BTTR_FIXTURES = SHARED / "fixtures/parity/bttr"
FAST = ["--beam", "1", "--max-len", "8", "--mode", "l2r"]  # the CPU time of a test stays small
RATE_KEYS = ("exprate", "le1", "le2", "le3")


def levenshtein(a: list[str], b: list[str]) -> int:
    """Plain dynamic-programming edit distance, independent of hmerzoo.metrics."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def check_consistent(out_dir: Path, splits: list[str], counts: dict[str, int]) -> tuple[dict, list[dict]]:
    """Recompute every split's rates from predictions.jsonl and compare them with summary.json."""
    summary = json.loads((out_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert "token edit distance" in summary["metric"] and "lgeval" in summary["metric"]
    assert list(summary["splits"]) == splits
    assert set(summary["decode"]) == {"beam_size", "max_len", "alpha", "mode", "batching", "batch_size"}
    for split in splits:
        rows = [r for r in records if r["split"] == split]
        assert len(rows) == counts[split] == summary["splits"][split]["count"]
        assert len({r["name"] for r in rows}) == len(rows)
        for r in rows:
            assert set(r) == {"split", "name", "prediction", "truth", "distance", "score"}
            assert r["distance"] == levenshtein(r["prediction"].split(), r["truth"].split())
        metrics = summary["splits"][split]
        for k, key in enumerate(RATE_KEYS):
            assert metrics[key] == pytest.approx(sum(r["distance"] <= k for r in rows) / len(rows))
        assert metrics["images_per_s"] > 0 and metrics["seconds"] > 0
    return summary, records


# --- a stand-in model with known answers --------------------------------------------------------------------------
class AnswerModel(torch.nn.Module):
    """Answers image i (in the order eval asks) with the truth missing its last ``i % 5`` tokens."""

    def __init__(self, vocab: Vocabulary, truths: list[list[int]]):
        super().__init__()
        self.vocab = vocab
        self.recipe = {"decode": {"beam_size": 10, "mode": "bttr"}}
        self.truths = truths
        self.asked = 0
        self.calls: list[dict] = []
        self.weight = torch.nn.Parameter(torch.zeros(1))  # so the model has a device

    def recognize(self, images, **decode) -> list[Recognition]:
        assert all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == 1 for t in images)
        self.calls.append(decode)
        out = []
        for _ in images:
            i, truth = self.asked, list(self.truths[self.asked])
            self.asked += 1
            edits = i % 5  # drop that many tokens from the end: distance min(edits, len(truth))
            answer = truth[:max(0, len(truth) - edits)]
            out.append(Recognition(latex=self.vocab.to_latex(answer), tokens=answer, score=-float(i)))
        return out


def expected_rates(truths: list[list[int]]) -> dict[str, float]:
    distances = [min(i % 5, len(truth)) for i, truth in enumerate(truths)]
    return {key: sum(d <= k for d in distances) / len(distances) for k, key in enumerate(RATE_KEYS)}


def test_eval_with_known_answers(sample_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    vocab = Vocabulary.from_dictionary(str(sample_root / "dictionary.txt"))
    truths = [r.ids for r in CrohmeDataset(sample_root, "2014", vocab).samples]
    model = AnswerModel(vocab, truths)
    monkeypatch.setattr(hmerzoo.builder, "load_model", lambda path, map_location="cpu": model)
    out = tmp_path / "out"
    status = main(["eval", str(tmp_path), "--data", str(sample_root), "--split", "2014", "--out", str(out),
                   "--batch-size", "5", "--device", "cpu"])
    captured = capsys.readouterr()
    assert status == 0
    summary, records = check_consistent(out, ["2014"], {"2014": 32})
    rates = summary["splits"]["2014"]
    for key, value in expected_rates(truths).items():
        assert rates[key] == pytest.approx(value), key
    assert 0 < rates["exprate"] < rates["le1"] < rates["le2"] < rates["le3"] < 1
    # the recipe's decode settings with the command line on top, handed to recognize in chunks of a multiple of 5
    # (60: enough images for per_image batching to group similar sizes)
    assert summary["decode"]["mode"] == "bttr" and summary["decode"]["beam_size"] == 10
    assert summary["decode"]["batch_size"] == 5 and summary["decode"]["batching"] == "per_image"
    assert all(c == summary["decode"] for c in model.calls)
    assert RECOGNIZE_CHUNK // 5 * 5 == 60 and len(model.calls) == 1  # 32 images, up to 60 at a time
    assert [r["name"] for r in records] == CrohmeDataset(sample_root, "2014", vocab).names  # caption order
    # the table: one per split, with the rates and the count
    assert "split 2014" in captured.out and "ExpRate" in captured.out and "≤3" in captured.out
    assert f"{100 * rates['exprate']:.2f} %" in captured.out and "32" in captured.out
    assert "2014: 32/32 images" in captured.err  # plain progress lines when not on a terminal


def test_evaluate_split_limit_is_a_seeded_subset(sample_root: Path) -> None:
    vocab = Vocabulary.from_dictionary(str(sample_root / "dictionary.txt"))
    dataset = CrohmeDataset(sample_root, "2014", vocab)
    names = []
    for _ in range(2):
        written: list[dict] = []
        model = AnswerModel(vocab, [r.ids for r in dataset.samples])
        metrics = evaluate_split(model, sample_root, "2014", {"batch_size": 3}, limit=7, write=written.append,
                                 console=_NullConsole())
        assert metrics["count"] == 7 == len(written)
        names.append([w["name"] for w in written])
    assert names[0] == names[1] and set(names[0]) <= set(dataset.names)


class _NullConsole:
    is_terminal = False

    def print(self, *args, **kwargs) -> None:
        pass


# --- the converted BTTR fixture model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bttr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (BTTR_FIXTURES / "state_dict.safetensors").is_file():
        pytest.skip(f"BTTR parity fixtures not found at {BTTR_FIXTURES} (set HMERZOO_SHARED)")
    from hmerzoo.convert import convert

    return convert("bttr", BTTR_FIXTURES / "state_dict.safetensors", tmp_path_factory.mktemp("bttr"))


def test_eval_sample_folder(bttr_dir: Path, sample_root: Path, tmp_path: Path, capsys) -> None:
    predictions = []
    for batch_size in ("1", "3"):  # per-image decoding: the chunking must not change a result
        out = tmp_path / batch_size
        status = main(["eval", str(bttr_dir), "--data", str(sample_root), "--split", "2014", "--limit", "3",
                       "--out", str(out), "--batch-size", batch_size, *FAST])
        captured = capsys.readouterr()
        assert status == 0, captured.out
        summary, records = check_consistent(out, ["2014"], {"2014": 3})
        predictions.append([(r["name"], r["prediction"], r["score"]) for r in records])
        assert "split 2014" in captured.out and "count" in captured.out
    assert predictions[0] == predictions[1]
    assert summary["model"] == str(bttr_dir.resolve()) and summary["limit"] == 3
    assert summary["decode"]["beam_size"] == 1 and summary["decode"]["max_len"] == 8
    assert summary["decode"]["mode"] == "l2r" and summary["decode"]["batch_size"] == 3
    assert summary["image_transform"] == "none"  # BTTR trained on images at their own size
    assert all(len(r["prediction"].split()) <= 8 for r in records)


def test_eval_zips_two_splits_default_out(bttr_dir: Path, crohme_root: Path, capsys) -> None:
    status = main(["eval", str(bttr_dir), "--data", str(crohme_root), "--split", "2014", "2016", "--limit", "1",
                   *FAST])
    captured = capsys.readouterr()
    assert status == 0, captured.out
    out = bttr_dir / "eval"  # the default: beside the model
    check_consistent(out, ["2014", "2016"], {"2014": 1, "2016": 1})
    assert "split 2014" in captured.out and "split 2016" in captured.out


def test_eval_errors(bttr_dir: Path, sample_root: Path, tmp_path: Path, capsys) -> None:
    cases = [(["--split", "2015"], "2015"), (["--split", "2014", "--mode", "sideways"], "sideways"),
             (["--split", "2014", "--limit", "0"], "--limit"), (["--split", "2014", "--beam", "0"], "beam_size")]
    for extra, needle in cases:
        status = main(["eval", str(bttr_dir), "--data", str(sample_root), "--out", str(tmp_path / "x"), *extra])
        out = capsys.readouterr().out
        assert status == 2 and needle in out, (extra, out)
    assert not (tmp_path / "x" / "predictions.jsonl").exists()
