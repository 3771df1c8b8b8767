"""``hmerzoo demo``: the JSON endpoint over HTTP, and the page in a real headless Chromium.

The model is the converted BTTR parity fixture (skips with the reason without ../shared or $HMERZOO_SHARED); every
answer is compared with ``model.recognize`` through the Python API on the same image bytes. The browser tests drive
Debian's ``chromium`` over the DevTools protocol (tests/cdp.py) and skip, with the reason, only where no Chromium is
found (``.ci/run`` installs it; $HMERZOO_CHROMIUM names another one).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdp import Browser, find_chromium
from conftest import shared_dir
from hmerzoo.attention_maps import attention_strip_png, token_attention
from hmerzoo.cli import build_parser
from hmerzoo.data.images import prepare_image, size_ranges_for_recipe
from hmerzoo.decoding.recognize import image_tensors
from hmerzoo.demo import make_server
from hmerzoo.demo.server import STATIC_DIR
from hmerzoo.demo.service import MAX_UPLOAD_BYTES
from parity_harness import load_fixture

pytestmark = pytest.mark.slow  # each recognition is a beam search of a full-size model on the CPU

# small search settings so each request takes seconds; the server and the API get the same ones
DECODE = {"beam_size": 2, "max_len": 30}
FIXTURE_IMAGE = "image1_18_em_1.png"  # 105x69, white ink on black, \sqrt { 4 8 }
CANVAS_OFFSET = (40, 30)  # where the browser test draws the fixture on the 800x300 canvas


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = shared_dir() / "fixtures" / "parity" / "bttr"
    if not directory.is_dir():
        pytest.skip(f"parity fixtures not found at {directory} (place ../shared beside the repo or set "
                    "HMERZOO_SHARED)")
    return load_fixture(directory, "bttr", tmp_path_factory)["model"]


@pytest.fixture(scope="module")
def fixture_image() -> Path:
    return shared_dir() / "fixtures" / "parity" / "bttr" / FIXTURE_IMAGE


@pytest.fixture(scope="module")
def reference(model, fixture_image):
    """The Python API's answer for the fixture image."""
    return model.recognize(str(fixture_image), **DECODE)[0]


@pytest.fixture(scope="module")
def server(model):
    srv = make_server(model, "127.0.0.1", 0, decode=DECODE, name="bttr-fixture", quiet=True,
                      attention=attention_strip_png)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def post(server, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + "api/recognize", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(server, path: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(server.url + path.lstrip("/"), timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), ""


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def assert_same_as_api(answer: dict, rec) -> None:
    assert answer["latex"] == rec.latex
    assert answer["tokens"] == [int(t) for t in rec.tokens]
    assert answer["score"] == pytest.approx(rec.score, abs=1e-5)
    hyps = answer["hypotheses"]
    assert hyps[0]["latex"] == rec.latex and hyps[0]["score"] == pytest.approx(rec.score, abs=1e-5)
    assert len({h["latex"] for h in hyps}) == len(hyps)  # one row per distinct formula
    scores = [h["score"] for h in hyps]
    assert scores == sorted(scores, reverse=True)  # BTTR's final choice is the best-ranked


# ---------------------------------------------------------------------------------------------------------------
# the server
def test_the_answer_carries_the_attention_strip_of_the_chosen_hypothesis(server, model, fixture_image, reference):
    status, answer = post(server, fixture_image.read_bytes())
    assert status == 200, answer
    header, _, payload = answer["attention"].partition(",")
    assert header == "data:image/png;base64"
    strip = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
    # the same picture as the strip drawn directly from the Python API's recognition of the same image
    image = image_tensors([str(fixture_image)], model.recipe)[0]
    expected = np.asarray(Image.open(io.BytesIO(attention_strip_png(model, image, reference))).convert("RGB"))
    assert strip.shape == expected.shape and np.array_equal(strip, expected)
    # one tile per recognised token: the maps it shows are the teacher-forced attention of those tokens
    direction = next(h.direction for h in reference.hypotheses if list(h.tokens) == list(reference.tokens))
    maps = token_attention(model, image, list(reference.tokens), direction).maps
    assert maps.shape[0] == len(reference.tokens)
    assert torch.allclose(maps.flatten(1).sum(1), torch.ones(len(reference.tokens)), atol=1e-4)


def test_cli_parses_demo():
    args = build_parser().parse_args(["demo", "runs/x", "--port", "0", "--beam", "3"])
    assert (args.model, args.host, args.port, args.beam) == ("runs/x", "127.0.0.1", 0, 3)


def test_a_port_in_use_fails_before_the_model_is_loaded(tmp_path):
    import socket

    from hmerzoo.demo import run_demo
    from hmerzoo.errors import HmerzooError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the model path does not exist: the port's error comes first
        with pytest.raises(HmerzooError, match=f"cannot serve on 127.0.0.1:{port}.*another --port"):
            run_demo(str(tmp_path / "no-model"), port=port)


def test_page_and_every_asset_it_names_are_served_by_the_package(server):
    status, page, kind = get(server, "/")
    assert status == 200 and kind.startswith("text/html")
    html = page.decode()
    assert 'id="pad"' in html and "<canvas" in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/") for a in assets), assets  # nothing from another host
    for asset in assets:
        assert get(server, asset)[0] == 200, asset
    css = get(server, "/static/vendor/katex/katex.min.css")[1].decode()
    fonts = sorted(set(re.findall(r"url\((fonts/[^)]+\.woff2)\)", css)))
    assert len(fonts) == 20
    for font in fonts:
        status, body, kind = get(server, "/static/vendor/katex/" + font)
        assert status == 200 and kind == "font/woff2" and body[:4] == b"wOF2", font
    assert (STATIC_DIR / "vendor" / "katex" / "LICENSE").read_text().startswith("The MIT License")
    assert not re.search(r"https?://", (STATIC_DIR / "demo.js").read_text())
    assert get(server, "/static/../server.py")[0] == 404
    info = json.loads(get(server, "/api/info")[1])
    assert info["decode"]["beam_size"] == 2 and info["decode"]["mode"] == "bttr"


def test_every_static_file_is_package_data():
    """pyproject's package-data patterns cover every file of the page, so an installed hmerzoo serves it too."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["hmerzoo.demo"]
    files = [p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert len(files) == 3 + 4 + 20  # page, script, style; KaTeX script, style, licence, version; 20 fonts
    # setuptools' '*' does not cross '/', fnmatch's does: compare directory by directory
    uncovered = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/")
                                             for p in patterns)]
    assert not uncovered


def test_bad_uploads_are_refused_with_a_reason_and_the_server_keeps_serving(server, fixture_image, reference):
    truncated = png_bytes(Image.new("L", (300, 200), 255))[:60]
    bomb = png_bytes(Image.new("1", (7000, 7000), 1))  # a small file that would decode to 49 megapixels
    cases = [
        (b"", 400, "the upload is empty"),
        (b"%PDF-1.4 this is no image", 400, "not an image"),
        (truncated, 400, "cannot be decoded"),
        (bomb, 413, "7000x7000 pixels"),
        (b"\0" * (MAX_UPLOAD_BYTES + 1), 413, "too large"),
    ]
    for data, status, words in cases:
        code, answer = post(server, data)
        assert (code, words in answer.get("error", "")) == (status, True), (words, code, answer)
    data = fixture_image.read_bytes()
    code, answer = post(server, data)
    assert code == 200, answer
    assert_same_as_api(answer, reference)
    assert answer["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert answer["size"] == [105, 69]
    assert answer["attention"].startswith("data:image/png;base64,")  # the strip (checked below)
    # the picture of what the model read is the prepared image, as predict prepares it
    read = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["model_input"].split(",", 1)[1]))))
    prepared = prepare_image(str(fixture_image), **size_ranges_for_recipe(server.service.model.recipe))
    assert np.array_equal(read, (prepared[0] * 255).round().to(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------------------------
# the page in Chromium
@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set HMERZOO_CHROMIUM)")
    b = Browser(executable)
    yield b
    b.close()


@pytest.fixture
def page(browser, server):
    browser.goto(server.url)
    browser.wait_for("typeof katex === 'object' && window.hmerzooDemo && hmerzooDemo.maxUploadBytes > 0")
    # submissions in these tests are explicit (the page would otherwise also submit a pause after a stroke)
    browser.evaluate("document.getElementById('auto').checked = false")
    return browser


def ink_runs(gray: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, first column, last column) of every horizontal run of ink: the strokes that redraw the image."""
    ink = gray > 127  # the fixture is white ink on black
    runs = []
    for y, row in enumerate(ink):
        edges = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
        runs += [(y, int(a), int(b) - 1) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]
    return runs


def wait_state(page, requests: int) -> str:
    """The page's state once its ``requests``-th request has been answered."""
    return page.wait_for(f"hmerzooDemo.requests >= {requests} && hmerzooDemo.state !== 'busy' && hmerzooDemo.state")


def wait_answer(page, requests: int = 1) -> dict:
    state = wait_state(page, requests)
    assert state == "done", page.evaluate("hmerzooDemo.lastError")
    return page.evaluate("hmerzooDemo.lastResult")


def shown(page) -> dict:
    return page.evaluate("""(async () => {
        await document.fonts.ready;
        return {latex: document.getElementById('latex').textContent,
                rendered: !!document.querySelector('#math .katex-html'),
                katexFont: [...document.fonts].some((f) => f.family.replace(/"/g, '') === 'KaTeX_Main'
                                                      && f.status === 'loaded'),
                rows: document.querySelectorAll('#hypotheses tbody tr').length,
                error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent};
    })()""")


def click(page, element_id: str) -> None:
    box = page.evaluate(f"(() => {{ const r = document.getElementById('{element_id}').getBoundingClientRect();"
                        " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
    page.call_many([("Input.dispatchMouseEvent", {"type": t, "x": box[0], "y": box[1], "button": "left",
                                                  "buttons": b, "clickCount": 1})
                    for t, b in (("mousePressed", 1), ("mouseReleased", 0))])


ink_pixels = ("(() => { const c = document.getElementById('pad');"
              " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
              " let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] < 128; return n; })()")


def test_drawing_the_fixture_on_the_canvas_gives_the_models_latex(page, model, fixture_image, reference):
    gray = np.asarray(Image.open(fixture_image).convert("L"))
    runs = ink_runs(gray)
    assert len(runs) > 100
    page.evaluate("document.getElementById('pen').value = 1")  # one-pixel strokes retrace the pixel rows
    left, top, width = page.evaluate("(() => { const c = document.getElementById('pad');"
                                     " const r = c.getBoundingClientRect();"
                                     " return [r.left + c.clientLeft, r.top + c.clientTop, c.clientWidth]; })()")
    assert width == 800  # one CSS pixel per canvas pixel: the strokes land where the image's ink is
    ox, oy = CANVAS_OFFSET
    # a slip of the pen far from the formula, taken back with Ctrl+Z: it must not reach the model
    page.call_many([("Input.dispatchMouseEvent", {"type": kind, "x": left + x, "y": top + 250, "button": "left",
                                                  "buttons": buttons, "clickCount": 1})
                    for kind, x, buttons in (("mousePressed", 600, 1), ("mouseMoved", 700, 1),
                                             ("mouseReleased", 700, 0))])
    assert page.evaluate(ink_pixels) > 0
    for kind in ("keyDown", "keyUp"):
        page.call("Input.dispatchKeyEvent", {"type": kind, "modifiers": 2, "key": "z", "code": "KeyZ",
                                             "windowsVirtualKeyCode": 90})
    assert page.evaluate(ink_pixels) == 0
    events = []
    for i, (y, x0, x1) in enumerate(runs):  # one stroke per run, through the page's pointer handlers
        cy, ax, bx = top + oy + y + 0.5, left + ox + x0 + 0.5, left + ox + x1 + 0.5
        device = ("mouse", "pen", "touch")[i % 3]  # the input devices a person writes with, taking turns
        if device == "touch":
            for kind, points in (("touchStart", [{"x": ax, "y": cy}]), ("touchMove", [{"x": bx, "y": cy}]),
                                 ("touchEnd", [])):
                events.append(("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points}))
            continue
        for kind, x, buttons in (("mousePressed", ax, 1), ("mouseMoved", bx, 1), ("mouseReleased", bx, 0)):
            events.append(("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": cy, "button": "left",
                                                        "buttons": buttons, "clickCount": 1, "pointerType": device}))
    page.evaluate("window.pointerTypes = new Set(); document.getElementById('pad').addEventListener("
                  "'pointerdown', (e) => pointerTypes.add(e.pointerType))")
    page.call_many(events)
    assert page.evaluate("hmerzooDemo.requests") == 0
    assert sorted(page.evaluate("[...pointerTypes]")) == ["mouse", "pen", "touch"]
    click(page, "recognize")
    answer = wait_answer(page)

    # the exact PNG the page sent, read back from the page and checked against what the server received
    sent = base64.b64decode(page.evaluate("hmerzooDemo.lastUpload").split(",", 1)[1])
    assert hashlib.sha256(sent).hexdigest() == answer["input_sha256"]
    drawn = Image.open(io.BytesIO(sent))
    rec = model.recognize(drawn, **DECODE)[0]
    assert_same_as_api(answer, rec)

    # the page crops and binarises as CROHME's images are (12 pixels of border before the ink, 11 after, black and
    # white), so retracing the fixture's rows reproduces the fixture but for a few pixels at the ends of the runs
    sent_gray = np.asarray(drawn.convert("L"))
    assert set(np.unique(sent_gray)) <= {0, 255}
    ink_rows, ink_cols = np.nonzero((sent_gray < 128).any(axis=1))[0], np.nonzero((sent_gray < 128).any(axis=0))[0]
    assert (ink_rows[0], ink_cols[0], sent_gray.shape[0] - 1 - ink_rows[-1], sent_gray.shape[1] - 1 - ink_cols[-1]) \
        == (12, 12, 11, 11)
    assert sent_gray.shape == gray.shape
    differing = int(((sent_gray < 128) != (gray > 127)).sum())
    assert differing <= 0.01 * gray.size, differing
    print(f"drawn {drawn.size}: {differing} pixels differ from the fixture; latex {rec.latex}")
    if differing == 0:  # the very image, inverted: the model must read what it reads in the fixture file
        assert answer["latex"] == reference.latex
    if os.environ.get("HMERZOO_DEMO_SHOTS"):  # a folder to keep what the browser showed, for people to look at
        shot = page.call("Page.captureScreenshot", {"format": "png"})["data"]
        Path(os.environ["HMERZOO_DEMO_SHOTS"], "drawn.png").write_bytes(base64.b64decode(shot))
        drawn.save(Path(os.environ["HMERZOO_DEMO_SHOTS"], "sent.png"))

    seen = shown(page)
    assert seen["latex"] == rec.latex and seen["error"] is None
    assert seen["rendered"] and seen["katexFont"]  # KaTeX drew it, with its fonts from the package
    assert seen["rows"] == len(answer["hypotheses"]) >= 2


def choose_file(page, path: Path) -> None:
    node = page.call("Runtime.evaluate", {"expression": "document.getElementById('file')"})["result"]["objectId"]
    page.call("DOM.setFileInputFiles", {"files": [str(path)], "objectId": node})


def drop_file(page, path: Path) -> None:
    """Drag a file from outside the browser and drop it on the canvas."""
    x, y = page.evaluate("(() => { const r = document.getElementById('pad').getBoundingClientRect();"
                         " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
    data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        page.call("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})


def test_uploading_the_fixture_image_gives_the_models_latex(page, fixture_image, reference):
    choose_file(page, fixture_image)
    answer = wait_answer(page)
    assert_same_as_api(answer, reference)
    seen = shown(page)
    assert seen["latex"] == reference.latex and seen["rendered"] and seen["error"] is None


def test_a_bad_upload_shows_a_message_and_a_dropped_image_then_works(page, fixture_image, reference, tmp_path):
    bad = tmp_path / "formula.png"
    bad.write_text("this is a text file, not a picture")
    choose_file(page, bad)
    assert wait_state(page, 1) == "error"
    seen = shown(page)
    assert seen["error"] is not None and "not an image" in seen["error"], seen
    drop_file(page, fixture_image)  # this time dropped on the canvas
    answer = wait_answer(page, 2)
    assert answer["latex"] == reference.latex
    assert shown(page)["error"] is None  # the message is gone once a request succeeds
