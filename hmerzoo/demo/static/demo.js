// hmerzoo demo page: a drawing canvas (pointer events: mouse, pen and touch alike), image upload and drop, and
// the answer of POST /api/recognize rendered with the vendored KaTeX. No network access beyond this server.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  const MARGIN_BEFORE = 12, MARGIN_AFTER = 11; // the border around the ink of every CROHME image
  const AUTO_DELAY_MS = 900;

  // What tests and curious people can read: the state of the last request, its answer and the bytes sent.
  const demo = (window.hmerzooDemo = { state: "idle", requests: 0, lastResult: null, lastError: null,
                                         lastUpload: null, maxUploadBytes: null });

  let strokes = []; // each: {width, points: [[x, y], ...]} in canvas pixels
  let current = null;
  let autoTimer = null;
  let requestId = 0;

  // ---- drawing -------------------------------------------------------------------------------------------
  function clearCanvas() {
    ctx.save();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, pad.width, pad.height);
    ctx.restore();
  }

  function drawSegment(stroke, from, to) {
    ctx.strokeStyle = "#000";
    ctx.fillStyle = "#000";
    ctx.lineWidth = stroke.width;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    if (from[0] === to[0] && from[1] === to[1]) { // a dot
      ctx.beginPath();
      ctx.arc(to[0], to[1], stroke.width / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0], to[1]);
    ctx.stroke();
  }

  function redraw() {
    clearCanvas();
    for (const s of strokes) {
      drawSegment(s, s.points[0], s.points[0]);
      for (let i = 1; i < s.points.length; i++) drawSegment(s, s.points[i - 1], s.points[i]);
    }
  }

  // Canvas pixels of a pointer position: inside the border (clientLeft/Top), scaled from the CSS size.
  function canvasPoint(e) {
    const r = pad.getBoundingClientRect();
    return [(e.clientX - r.left - pad.clientLeft) * pad.width / pad.clientWidth,
            (e.clientY - r.top - pad.clientTop) * pad.height / pad.clientHeight];
  }

  pad.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    e.preventDefault();
    pad.setPointerCapture(e.pointerId);
    clearTimeout(autoTimer);
    const p = canvasPoint(e);
    current = { width: Number($("pen").value), points: [p], pointerId: e.pointerId };
    strokes.push(current);
    drawSegment(current, p, p);
  });

  pad.addEventListener("pointermove", (e) => {
    if (!current || e.pointerId !== current.pointerId) return;
    e.preventDefault();
    // a pen or a fast finger reports several positions per frame: use them all for a smooth line
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const ev of events.length ? events : [e]) {
      const p = canvasPoint(ev);
      drawSegment(current, current.points[current.points.length - 1], p);
      current.points.push(p);
    }
  });

  function endStroke(e) {
    if (!current || e.pointerId !== current.pointerId) return;
    current = null;
    if ($("auto").checked) autoTimer = setTimeout(recognizeDrawing, AUTO_DELAY_MS);
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  function undo() { strokes.pop(); redraw(); }
  $("clear").addEventListener("click", () => { strokes = []; clearTimeout(autoTimer); redraw(); });
  $("undo").addEventListener("click", undo);
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); undo(); }
    else if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); recognizeDrawing(); }
  });

  // The drawing as the model's training images look: the ink's bounding box (pixels darker than mid-grey) with
  // CROHME's border of 12 pixels left and top, 11 right and bottom, black on white, as PNG.
  function drawingBlob() {
    const { data, width, height } = ctx.getImageData(0, 0, pad.width, pad.height);
    let x0 = width, y0 = height, x1 = -1, y1 = -1;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        if (data[4 * (y * width + x)] < 128) {
          if (x < x0) x0 = x;
          if (x > x1) x1 = x;
          if (y < y0) y0 = y;
          if (y > y1) y1 = y;
        }
      }
    }
    if (x1 < 0) return Promise.resolve(null); // only faint strokes: nothing a model would see as ink
    const out = document.createElement("canvas");
    out.width = x1 - x0 + 1 + MARGIN_BEFORE + MARGIN_AFTER;
    out.height = y1 - y0 + 1 + MARGIN_BEFORE + MARGIN_AFTER;
    const octx = out.getContext("2d");
    octx.fillStyle = "#fff";
    octx.fillRect(0, 0, out.width, out.height);
    octx.drawImage(pad, x0, y0, x1 - x0 + 1, y1 - y0 + 1, MARGIN_BEFORE, MARGIN_BEFORE, x1 - x0 + 1, y1 - y0 + 1);
    // CROHME's images are pure black and white (strokes rendered without anti-aliasing); the grey edges the canvas
    // smooths lines with are not what the models saw in training, so they become ink or paper
    const pixels = octx.getImageData(0, 0, out.width, out.height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const v = pixels.data[i] < 128 ? 0 : 255;
      pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = v;
      pixels.data[i + 3] = 255;
    }
    octx.putImageData(pixels, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  async function recognizeDrawing() {
    clearTimeout(autoTimer);
    const blob = strokes.length ? await drawingBlob() : null;
    if (!blob) return showError("nothing to recognise: write a formula on the canvas first");
    submit(blob);
  }
  $("recognize").addEventListener("click", recognizeDrawing);

  // ---- files: the picker and drag-and-drop ---------------------------------------------------------------
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    if (f) submit(f);
    $("file").value = ""; // choosing the same file again still submits it
  });
  pad.addEventListener("dragover", (e) => { e.preventDefault(); pad.classList.add("dragging"); });
  pad.addEventListener("dragleave", () => pad.classList.remove("dragging"));
  pad.addEventListener("drop", (e) => {
    e.preventDefault();
    pad.classList.remove("dragging");
    const f = e.dataTransfer.files[0];
    if (f) submit(f); else showError("drop an image file (PNG, JPEG, BMP, ...)");
  });

  // ---- talking to the server -----------------------------------------------------------------------------
  function readDataURL(blob) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error);
      r.readAsDataURL(blob);
    });
  }

  async function submit(blob) {
    const id = ++requestId;
    demo.requests += 1;
    demo.state = "busy";
    $("error").hidden = true;
    $("status").textContent = "recognising\u2026";
    if (demo.maxUploadBytes && blob.size > demo.maxUploadBytes) {
      return showError(`the file is too large (${(blob.size / 1e6).toFixed(1)} MB; at most ` +
                       `${(demo.maxUploadBytes / 1e6).toFixed(0)} MB)`, id);
    }
    demo.lastUpload = await readDataURL(blob);
    let answer;
    try {
      const response = await fetch("/api/recognize", {
        method: "POST", body: blob, headers: { "Content-Type": blob.type || "application/octet-stream" } });
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
      if (!response.ok || !body || body.error) {
        return showError((body && body.error) || `the server answered ${response.status} ${response.statusText}`, id);
      }
      answer = body;
    } catch (err) {
      return showError(`the server could not be reached (${err.message}); is hmerzoo demo still running?`, id);
    }
    if (id !== requestId) return; // a newer request is on its way: its answer is the one to show
    showResult(answer);
  }

  function showError(message, id) {
    if (id !== undefined && id !== requestId) return;
    demo.state = "error";
    demo.lastError = message;
    $("status").textContent = "";
    $("error").textContent = message;
    $("error").hidden = false;
    $("result").hidden = true; // an earlier answer would read as the answer to this request
  }

  function renderMath(latex, element, display) {
    try {
      katex.render(latex, element, { throwOnError: false, displayMode: display });
    } catch (err) { // KaTeX rejects the input itself (not merely a parse error): show the source instead
      element.textContent = latex;
    }
  }

  function showResult(r) {
    demo.lastResult = r;
    demo.lastError = null;
    $("status").textContent = "";
    $("result").hidden = false;
    renderMath(r.latex, $("math"), true);
    $("latex").textContent = r.latex;
    $("sent").src = r.model_input;
    const body = $("hypotheses").tBodies[0];
    body.replaceChildren();
    r.hypotheses.forEach((h, i) => {
      const row = body.insertRow();
      row.insertCell().textContent = String(i + 1);
      renderMath(h.latex, row.insertCell(), false);
      const tex = row.insertCell();
      tex.className = "tex";
      tex.textContent = h.latex;
      row.insertCell().textContent = h.score.toFixed(4);
      row.insertCell().textContent = h.direction || "";
    });
    showAttention(r.attention);
    demo.state = "done";
  }

  // The attention strip hook: shown when the server sends one (see hmerzoo.demo.service.AttentionStrip).
  function showAttention(dataUrl) {
    $("attention").hidden = !dataUrl;
    if (dataUrl) $("attention-strip").src = dataUrl;
  }

  $("copy").addEventListener("click", () => {
    if (navigator.clipboard) navigator.clipboard.writeText($("latex").textContent);
  });

  fetch("/api/info").then((r) => r.json()).then((info) => {
    demo.maxUploadBytes = info.max_upload_bytes;
    $("model").textContent = `${info.model} \u00b7 ${info.decode.mode}, beam ${info.decode.beam_size}`;
  }).catch(() => {});

  clearCanvas();
})();
