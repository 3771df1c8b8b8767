"""`hmerzoo data vocab | check | fetch` on tiny data the tests write themselves; nothing reaches the network (fetch
reads file:// URLs or a local HTTP server on 127.0.0.1)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hmerzoo.config as config
from hmerzoo.cli import main
from hmerzoo.data import CrohmeDataset
from hmerzoo.data.check import check_root, token_counts
from hmerzoo.data.fetch import CROHME_DICTIONARY, CROHME_URL, fetch
from hmerzoo.errors import DataError
from hmerzoo.vocab import Vocabulary

CAPTIONS = {"a1": "x + 1", "a2": "\\frac { x } { 2 }", "a3": "x ^ { 2 } + 1", "a4": "y"}


def _bmp(height: int = 20, width: int = 30) -> bytes:
    img = np.zeros((height, width), np.uint8)
    img[5:8, 4:20] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="BMP")
    return buf.getvalue()


def _root(tmp_path: Path, lines: list[str] | None = None, images: dict[str, bytes] | None = None) -> Path:
    root = tmp_path / "root"
    (root / "train").mkdir(parents=True)
    lines = lines if lines is not None else [f"{k}\t{v}" for k, v in CAPTIONS.items()]
    (root / "train" / "caption.txt").write_text("\n".join(lines) + "\n")
    for name, data in (images if images is not None else {k: _bmp() for k in CAPTIONS}).items():
        (root / "train" / f"{name}.bmp").write_bytes(data)
    (root / "dictionary.txt").write_text("\n".join(["+", "1", "2", "x", "y", "^", "{", "}", "\\frac"]) + "\n")
    return root


# --- vocab ------------------------------------------------------------------------------------------------------
def test_vocab_counts_and_dictionary(tmp_path, capsys):
    root = _root(tmp_path)
    counts = token_counts(root)
    assert counts == {"x": 3, "+": 2, "1": 2, "{": 3, "}": 3, "2": 2, "^": 1, "\\frac": 1, "y": 1}
    out = tmp_path / "dict.txt"
    assert main(["data", "vocab", str(root), "--out", str(out)]) == 0
    assert out.read_text().split("\n")[:-1] == sorted(counts)
    assert len(Vocabulary.from_dictionary(str(out))) == 9 + 3  # a dictionary hmerzoo reads
    printed = capsys.readouterr().out
    assert re.search(r"^\s+3\s+x$", printed, re.M) and "9 tokens, 18 occurrences" in printed


def test_vocab_of_the_shipped_crohme_matches_its_dictionary(crohme_root):
    counts = token_counts(crohme_root, ["2014"])
    shipped = (crohme_root / "dictionary.txt").read_text().split()
    assert set(counts) <= set(shipped) and len(counts) == 108 and sum(counts.values()) == 15897


# --- check ------------------------------------------------------------------------------------------------------
def test_check_clean_root(tmp_path, capsys):
    root = _root(tmp_path)
    result = check_root(root)
    assert result.ok and result.stats["train"].samples == 4
    assert main(["data", "check", str(root)]) == 0
    assert "ok;" in capsys.readouterr().out


def test_check_names_every_planted_fault(tmp_path, capsys):
    lines = ["a1\tx + 1",            # 1 fine
             "a2\tx \\alpha z",       # 2 two tokens not in the dictionary
             "a3\t",                  # 3 empty caption
             "a1\ty",                 # 4 duplicate of line 1
             "a5\tx",                 # 5 no image
             "a6 x + 1",              # 6 no tab
             "a7\tx",                 # 7 image that does not decode
             "a8\tx + 1 + 1 + 1",     # 8 long (counted only)
             "a9\ty"]                 # 9 big image (counted only)
    images = {"a1": _bmp(), "a2": _bmp(), "a3": _bmp(), "a6": _bmp(), "a7": b"BM this is not a bitmap",
              "a8": _bmp(), "a9": _bmp(40, 40)}
    root = _root(tmp_path, lines, images)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: bttr\ndata:\n  max_len: 5\n  max_image_pixels: 1000\n")
    assert main(["data", "check", str(root), "--recipe", str(recipe)]) == 1
    out = capsys.readouterr().out
    caption = str(root / "train" / "caption.txt")
    expected = {2: "not in dictionary.txt: \\alpha z", 3: "empty caption for 'a3'",
                4: f"duplicate name 'a1' (first at {caption}:1)", 5: "no image 'a5'",
                6: "no tab between the name and the caption", 7: "image does not decode"}
    for line, what in expected.items():  # each on its own line, unwrapped
        assert re.search(rf"^{re.escape(f'{caption}:{line}: ')}.*{re.escape(what)}", out, re.M), (line, out)
    result = check_root(root, config.DataConfig(max_len=5, max_image_pixels=1000))
    st = result.stats["train"]
    assert (st.samples, st.unknown_tokens, st.empty, st.duplicates, st.missing_images, st.malformed,
            st.bad_images, st.too_long, st.too_big) == (9, 1, 1, 1, 1, 1, 1, 1, 1)
    assert len(result.problems) == 6
    assert "6 problem(s)" in out


def test_check_without_a_dictionary_is_a_problem(tmp_path):
    root = _root(tmp_path)
    (root / "dictionary.txt").unlink()
    result = check_root(root)
    assert not result.ok and "hmerzoo data vocab" in result.problems[0]


# --- fetch ------------------------------------------------------------------------------------------------------
def _data_zip(path: Path, img_folder: bool = True) -> str:
    """A BTTR/CoMER-style data.zip: data/<split>/caption.txt and the images (in img/ for CoMER)."""
    with zipfile.ZipFile(path, "w") as zf:
        for split, names in {"train": ["t1", "t2", "t3"], "2014": ["e1", "e2"]}.items():
            zf.writestr(f"data/{split}/caption.txt", "".join(f"{n}\tx + 1\n" for n in names))
            for n in names:
                zf.writestr(f"data/{split}/{'img/' if img_folder else ''}{n}.bmp", _bmp())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("img_folder", [True, False])
def test_fetch_from_a_file_url(tmp_path, img_folder):
    digest = _data_zip(tmp_path / "data.zip", img_folder)
    dest = tmp_path / "out" / "crohme"
    root, got, verified = fetch("crohme", to=dest, url=(tmp_path / "data.zip").as_uri(), sha256=digest.upper(),
                                progress=False)
    assert root == dest and got == digest and verified
    assert _leftovers(dest.parent) == ["crohme"]  # no temporary folder left beside it
    assert sorted(p.name for p in (dest / "train").iterdir()) == ["caption.txt", "t1.bmp", "t2.bmp", "t3.bmp"]
    assert (dest / "dictionary.txt").read_text().split() == CROHME_DICTIONARY and len(CROHME_DICTIONARY) == 110
    vocab = Vocabulary.from_dictionary(str(dest / "dictionary.txt"))
    assert len(CrohmeDataset(dest, "2014", vocab)) == 2 and len(CrohmeDataset(dest, "train", vocab)) == 3


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path):
    _data_zip(tmp_path / "data.zip")
    dest = tmp_path / "new" / "deeper" / "crohme"
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch("crohme", to=dest, url=str(tmp_path / "data.zip"), sha256="0" * 64, progress=False)
    assert not (tmp_path / "new").exists()  # not even the parent folders it made
    assert _leftovers(tmp_path) == ["data.zip"]


def test_default_url_is_checked_against_its_git_blob_id(tmp_path, monkeypatch):
    import subprocess

    import hmerzoo.data.fetch as fetch_module

    _data_zip(tmp_path / "data.zip")
    blob = fetch_module.git_blob_id(tmp_path / "data.zip")
    try:  # the id git itself gives the file, where git is installed
        out = subprocess.run(["git", "hash-object", str(tmp_path / "data.zip")], capture_output=True, text=True)
        assert out.returncode != 0 or out.stdout.strip() == blob
    except FileNotFoundError:
        pass
    assert fetch_module.CROHME_GIT_BLOB == "4f6b9856f8d9a26b885fe05a64546e2ff89ba253"  # CoMER's tree, ee15cdbe
    url = (tmp_path / "data.zip").as_uri()
    monkeypatch.setitem(fetch_module.DATASETS, "crohme", (url, None, "1" * 40))
    with pytest.raises(DataError, match="git blob id .*expected 1111"):
        fetch("crohme", to=tmp_path / "bad", progress=False)
    assert _leftovers(tmp_path) == ["data.zip"]
    monkeypatch.setitem(fetch_module.DATASETS, "crohme", (url, None, blob))
    root, _, verified = fetch("crohme", to=tmp_path / "good", progress=False)
    assert verified and (root / "train" / "caption.txt").is_file()
    # another URL is not held to the default file's id
    _, _, verified = fetch("crohme", to=tmp_path / "other", url=str(tmp_path / "data.zip"), progress=False)
    assert not verified


def test_fetch_bad_archive_and_missing_url_leave_nothing(tmp_path, capsys):
    (tmp_path / "page.html").write_text("<html>not found</html>")
    dest = tmp_path / "crohme"
    with pytest.raises(DataError, match="not a zip archive"):
        fetch("crohme", to=dest, url=str(tmp_path / "page.html"), progress=False)
    with pytest.raises(DataError, match="cannot download"):
        fetch("crohme", to=dest, url=(tmp_path / "absent.zip").as_uri(), progress=False)
    assert main(["data", "fetch", "crohme", "--to", str(dest), "--url", str(tmp_path / "absent.zip")]) == 2
    assert "cannot download" in capsys.readouterr().out
    assert _leftovers(tmp_path) == ["page.html"]


def test_fetch_refuses_a_non_empty_destination(tmp_path):
    digest = _data_zip(tmp_path / "data.zip")
    dest = tmp_path / "crohme"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="already exists and is not empty"):
        fetch("crohme", to=dest, url=str(tmp_path / "data.zip"), sha256=digest, progress=False)
    assert _leftovers(dest) == ["mine.txt"]


def test_fetch_over_http_to_the_user_cache(tmp_path, monkeypatch, capsys):
    digest = _data_zip(tmp_path / "data.zip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HMERZOO_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("HMERZOO_DATA", raising=False)
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        assert main(["data", "fetch", "crohme", "--url", url, "--sha256", digest]) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    out = capsys.readouterr()
    assert f"sha256 {digest} (verified)" in out.out
    cache = tmp_path / "home" / "datasets" / "crohme"
    assert (cache / "train" / "t1.bmp").is_file()
    # an installed package (no checkout data) now finds the fetched root by itself
    monkeypatch.setattr(config, "repo_data_root", lambda: tmp_path / "nowhere")
    assert config.resolve_data_root() == str(cache)


def test_default_url_is_the_comer_archive_and_unknown_datasets_fail(tmp_path):
    assert CROHME_URL.startswith("https://") and CROHME_URL.endswith("/data.zip")
    with pytest.raises(DataError, match="unknown dataset 'hme100k'"):
        fetch("hme100k", to=tmp_path / "x")


def test_render_verb_writes_a_crohme_split_per_inkml_folder(tmp_path, capsys):
    from test_inkml import write_root

    root = write_root(tmp_path / "ink", n=2)
    assert main(["data", "render", str(root / "train"), "--out", str(tmp_path / "one"), "--jobs", "1",
                 "--quiet"]) == 0
    assert (tmp_path / "one" / "caption.txt").read_text() == "ex_0\tx ^ { 2 }\nex_1\tx ^ { 2 }\n"
    assert "wrote 2 images" in capsys.readouterr().out
    # a folder of split folders: one output folder each, read back as a CROHME root
    assert main(["data", "render", str(root), "--out", str(tmp_path / "all"), "--jobs", "2", "--quiet",
                 "--margin", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["test", "train"]
    assert token_counts(tmp_path / "all") == {"x": 2, "^": 2, "{": 4, "}": 4, "2": 2, "\\frac": 1, "a": 1, "b": 1}
    small = Image.open(tmp_path / "all" / "train" / "ex_0.bmp")
    assert small.size[1] == Image.open(tmp_path / "one" / "ex_0.bmp").size[1] - 2 * (12 - 4)
    # an existing destination is refused, not overwritten
    assert main(["data", "render", str(root / "train"), "--out", str(tmp_path / "one"), "--quiet"]) == 2


def test_show_verb_draws_a_contact_sheet(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    root = _root(tmp_path)
    out = tmp_path / "sheet.png"
    assert main(["data", "show", str(root), "--out", str(out), "-n", "3", "--columns", "2"]) == 0
    assert f"wrote {out}: 3 of 4 samples" in capsys.readouterr().out
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.size[0] >= 800 and sheet.size[1] >= 500
        pixels = np.asarray(sheet.convert("L"))
    assert (pixels < 50).mean() > 0.01  # the images' black backgrounds are drawn
    with pytest.raises(SystemExit):
        main(["data", "show", str(root)])  # --out is required
