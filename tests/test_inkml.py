"""The inkml data format: parsing, rendering (sizes, margin, binarisation, determinism), the render cache, detection."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from hmerzoo.data import InkmlDataset, dataset_class, detect_format
from hmerzoo.data.inkml import RenderSettings, parse_inkml, render, symbol_height
from hmerzoo.data.inkml_format import cache_dir, inkml_splits, render_files, split_files
from hmerzoo.errors import DataError
from hmerzoo.vocab import Vocabulary

NS = 'xmlns="http://www.w3.org/2003/InkML"'


def crohme_inkml(truth: str, strokes: list[list[tuple[float, float]]], labels: list[str] | None = None) -> str:
    """A CROHME-style InkML: namespaced, a truth annotation, one symbol group per stroke."""
    traces = "".join(f'<trace id="{i}">{", ".join(f"{x} {y}" for x, y in s)}</trace>' for i, s in enumerate(strokes))
    groups = "".join(f'<traceGroup xml:id="{100 + i}"><annotation type="truth">{lab}</annotation>'
                     f'<traceView traceDataRef="{i}"/></traceGroup>' for i, lab in enumerate(labels or []))
    return (f'<ink {NS}><annotation type="truth">{truth}</annotation><annotation type="UI">x</annotation>'
            f'{traces}<traceGroup xml:id="99"><annotation type="truth">Segmentation</annotation>{groups}'
            f'</traceGroup></ink>')


def mathwriting_inkml(label: str, strokes: list[list[tuple[float, float]]]) -> str:
    """A MathWriting-style InkML: a normalizedLabel, x y t points, no symbol groups."""
    traces = "".join(f'<trace>{",".join(f"{x} {y} {t}" for t, (x, y) in enumerate(s))}</trace>' for s in strokes)
    return (f'<ink {NS}><annotation type="label">raw</annotation>'
            f'<annotation type="normalizedLabel">{label}</annotation>{traces}</ink>')


# "x^2": a cross 100 units tall and a small '2' up and to the right, each one symbol
X_STROKES = [[(0, 0), (100, 100)], [(100, 0), (0, 100)], [(120, -40), (150, -40), (120, 0), (150, 0)]]
X_TRUTH = "$x^2$"


def write_root(root, n=3, zipped=False):
    """A root with a train split of n CROHME-style files and a test split of one MathWriting-style file."""
    (root / "train").mkdir(parents=True)
    for i in range(n):
        strokes = [[(x + 10 * i, y) for x, y in s] for s in X_STROKES]
        (root / "train" / f"ex_{i}.inkml").write_text(crohme_inkml(X_TRUTH, strokes, ["x", "x", "2"]))
    test = mathwriting_inkml("\\frac{a}{b}", [[(0, 0), (0, 50)], [(-10, 60), (10, 60)], [(0, 70), (0, 120)]])
    if zipped:
        with zipfile.ZipFile(root / "test.zip", "w") as zf:
            zf.writestr("test/mw_0.inkml", test)
    else:
        (root / "test").mkdir()
        (root / "test" / "mw_0.inkml").write_text(test)
    return root


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HMERZOO_HOME", str(tmp_path / "home"))


def test_parse_crohme_and_mathwriting():
    ink = parse_inkml(crohme_inkml(X_TRUTH, X_STROKES, ["x", "x", "2"]).encode())
    assert ink.label == X_TRUTH and len(ink.strokes) == 3 and ink.symbols == [[0], [1], [2]]
    assert ink.strokes[2].shape == (4, 2) and ink.strokes[2][0].tolist() == [120, -40]
    mw = parse_inkml(mathwriting_inkml("a+b", [[(0, 0), (1, 2)]]).encode())
    assert mw.label == "a+b" and mw.symbols == [] and mw.strokes[0].tolist() == [[0, 0], [1, 2]]
    with pytest.raises(DataError, match="not valid InkML"):
        parse_inkml(b"<ink><trace>", "bad.inkml")


def test_symbol_height_is_the_rms_over_symbols():
    ink = parse_inkml(crohme_inkml(X_TRUTH, X_STROKES, ["x", "x", "2"]).encode())
    assert symbol_height(ink) == pytest.approx(np.sqrt((100 ** 2 + 100 ** 2 + 40 ** 2) / 3))
    # no symbol groups: strokes' heights / 0.7
    mw = parse_inkml(mathwriting_inkml("1", [[(0, 0), (0, 70)]]).encode())
    assert symbol_height(mw) == pytest.approx(100.0)


def test_render_size_margin_and_binarisation():
    # one symbol, a vertical bar 100 units tall: scaled to 32 px, plus half a 3.5 px stroke and 12 px each side
    ink = parse_inkml(crohme_inkml("1", [[(0, 0), (0, 100)]], ["1"]).encode())
    image = render(ink)
    assert image.dtype == np.uint8 and set(np.unique(image)) == {0, 255}
    assert image.shape == (int(np.ceil(32 + 2 * (12 + 1.75))), int(np.ceil(2 * (12 + 1.75))))  # (60, 28)
    rows = np.flatnonzero(image.max(axis=1))
    cols = np.flatnonzero(image.max(axis=0))
    assert rows[0] == 12 and rows[-1] == image.shape[0] - 13  # 12 px of black above and below the ink
    assert 3 <= len(cols) <= 4  # the stroke is 3.5 px wide
    assert 32 + 3 <= len(rows) <= 32 + 4


def test_render_is_deterministic_and_settings_change_it():
    ink = parse_inkml(crohme_inkml(X_TRUTH, X_STROKES, ["x", "x", "2"]).encode())
    a, b = render(ink), render(ink)
    assert np.array_equal(a, b)
    wide = render(ink, RenderSettings(stroke_width=6.0))
    assert wide.sum() > a.sum()
    tall = render(ink, RenderSettings(symbol_height=64.0))
    assert tall.shape[0] - 24 > 1.8 * (a.shape[0] - 24)
    assert RenderSettings().key() != RenderSettings(margin=10).key() and RenderSettings().key() == RenderSettings().key()


def test_render_files_writes_the_crohme_layout_identically_with_one_or_two_jobs(tmp_path):
    root = write_root(tmp_path / "ink", n=4)
    files = split_files(root, "train")
    one = render_files(files, tmp_path / "one", jobs=1, progress=False)
    two = render_files(files, tmp_path / "two", jobs=2, progress=False)
    assert one.rendered == two.rendered == 4 and not one.skipped
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["caption.txt", "ex_0.bmp", "ex_1.bmp", "ex_2.bmp", "ex_3.bmp"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (tmp_path / "one" / "caption.txt").read_text().splitlines()[0] == "ex_0\tx ^ { 2 }"
    with pytest.raises(DataError, match="exists already"):
        render_files(files, tmp_path / "one", progress=False)


def test_files_without_label_or_ink_are_skipped_and_listed(tmp_path):
    root = write_root(tmp_path / "ink", n=1)
    (root / "train" / "nolabel.inkml").write_text(crohme_inkml("", X_STROKES))
    (root / "train" / "noink.inkml").write_text(crohme_inkml("x", []))
    result = render_files(split_files(root, "train"), tmp_path / "out", jobs=1, progress=False)
    assert result.rendered == 1 and len(result.skipped) == 2
    listed = (tmp_path / "out" / "skipped.txt").read_text()
    assert "nolabel.inkml: no label" in listed and "noink.inkml: the InkML has no stroke points" in listed
    assert (tmp_path / "out" / "caption.txt").read_text() == "ex_0\tx ^ { 2 }\n"


@pytest.mark.parametrize("zipped", [False, True])
def test_inkml_dataset_renders_once_into_a_cache(tmp_path, monkeypatch, zipped):
    root = write_root(tmp_path / "ink", zipped=zipped)
    assert inkml_splits(root) == ["test", "train"]
    assert detect_format(root) == "inkml" and dataset_class(root) is InkmlDataset
    vocab = Vocabulary(["<pad>", "<sos>", "<eos>", "x", "^", "{", "}", "2", "\\frac", "a", "b"])
    monkeypatch.setattr(InkmlDataset, "render_jobs", 1)
    train = InkmlDataset(root, "train", vocab)
    assert len(train) == 3 and train.names == ["ex_0", "ex_1", "ex_2"]
    sample = train[0]
    assert sample.image.shape[0] == 1 and set(sample.image.unique().tolist()) == {0.0, 1.0}
    assert vocab.decode(sample.ids) == ["x", "^", "{", "2", "}"]
    test = InkmlDataset(root, "test", vocab)
    assert [vocab.tokens[i] for i in test[0].ids] == ["\\frac", "{", "a", "}", "{", "b", "}"]
    cached = cache_dir(root, "train", split_files(root, "train"), RenderSettings())
    assert (cached / "caption.txt").is_file() and str(cached).startswith(str(tmp_path / "home" / "rendered"))

    # a second open reads the cache: rendering again would fail here
    import hmerzoo.data.inkml_format as fmt

    monkeypatch.setattr(fmt, "render_files", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-rendered")))
    again = InkmlDataset(root, "train", vocab)
    assert np.array_equal(again[1].image.numpy(), train[1].image.numpy())
    # other settings, another cache folder
    assert cache_dir(root, "train", split_files(root, "train"), RenderSettings(margin=4)) != cached


def test_changed_files_get_a_new_cache_entry(tmp_path):
    root = write_root(tmp_path / "ink", n=2)
    before = cache_dir(root, "train", split_files(root, "train"), RenderSettings())
    (root / "train" / "ex_2.inkml").write_text(crohme_inkml("y", [[(0, 0), (0, 9)]], ["y"]))
    assert cache_dir(root, "train", split_files(root, "train"), RenderSettings()) != before


def test_missing_split_names_the_splits_found(tmp_path):
    root = write_root(tmp_path / "ink")
    with pytest.raises(DataError, match="no InkML split 'valid'.*InkML splits there: test, train"):
        split_files(root, "valid")


def test_an_inkml_zip_is_not_taken_for_a_crohme_split(tmp_path):
    root = write_root(tmp_path / "ink", zipped=True)  # test.zip holds InkML
    assert detect_format(root) == "inkml"


def test_read_label_stops_before_the_strokes_and_agrees_with_the_parser():
    from hmerzoo.data.inkml import read_label

    for text in (crohme_inkml(X_TRUTH, X_STROKES, ["x", "x", "2"]), mathwriting_inkml("a+b", [[(0, 0), (1, 1)]])):
        assert read_label(text.encode()) == parse_inkml(text.encode()).label
    # a symbol's truth is not the expression's
    assert read_label(crohme_inkml("", X_STROKES, ["x", "x", "2"]).encode()) is None


def test_vocabulary_of_an_inkml_root_is_read_without_rendering(tmp_path):
    from hmerzoo.data.check import labels_vocabulary

    root = write_root(tmp_path / "ink")
    vocab = labels_vocabulary({"data": {"root": str(root)}})
    assert vocab.tokens == ["<pad>", "<sos>", "<eos>", "2", "\\frac", "^", "a", "b", "x", "{", "}"]
    assert not (tmp_path / "home" / "rendered").exists()


def test_a_render_finished_first_elsewhere_is_used(tmp_path, monkeypatch):
    # two processes (DDP ranks) rendering the same split: the one that finishes second keeps the first's cache
    import hmerzoo.data.inkml_format as fmt

    root = write_root(tmp_path / "ink", n=1)
    files = split_files(root, "train")
    out = cache_dir(root, "train", files, RenderSettings())
    real_replace = fmt.os.replace

    def replace_after_another_rank(src, dst):
        monkeypatch.setattr(fmt.os, "replace", real_replace)  # the other rank renames as usual
        render_files(files, dst, jobs=1, progress=False)  # ... and wins the race
        real_replace(src, dst)

    monkeypatch.setattr(fmt.os, "replace", replace_after_another_rank)
    with pytest.raises(DataError, match="exists already"):
        render_files(files, tmp_path / "other", jobs=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ink", "other"]  # no temporary folder left
    monkeypatch.setattr(fmt.os, "replace", replace_after_another_rank)
    monkeypatch.setattr(InkmlDataset, "render_jobs", 1)
    vocab = Vocabulary(["<pad>", "<sos>", "<eos>", "x", "^", "{", "}", "2"])
    assert len(InkmlDataset(root, "train", vocab)) == 1
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_vocab_verb_on_an_inkml_root_renders_nothing(tmp_path, capsys):
    from hmerzoo.cli import main

    root = write_root(tmp_path / "ink")
    assert main(["data", "vocab", str(root), "--split", "train", "--out", str(tmp_path / "d.txt")]) == 0
    assert (tmp_path / "d.txt").read_text().split() == ["2", "^", "x", "{", "}"]
    assert "5 tokens, 15 occurrences" in capsys.readouterr().out
    assert not (tmp_path / "home" / "rendered").exists()
