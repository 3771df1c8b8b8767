"""ONNX export + the onnxruntime backend: the same search over the exported graphs returns what PyTorch returns.

Each shipped system's converted parity model is exported, then both fixture images are recognised by PyTorch
(``model.recognize``) and by onnxruntime (``--backend onnxruntime``) with the system's own decode mode: the same
tokens for every hypothesis of both beams, scores within 1e-4. The fixture images are not the size the graphs were
traced with, so this also checks the dynamic axes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hmerzoo.cli import main
from test_attention_maps import GOLDEN_SYSTEMS, system_fixture

pytest.importorskip("onnxruntime", reason="the ONNX tests need the [onnx] extra (onnx, onnxruntime)")
pytest.importorskip("onnx", reason="the ONNX tests need the [onnx] extra (onnx, onnxruntime)")

from hmerzoo.export import export_onnx, load_onnx_model  # noqa: E402

SCORE_TOL = 1e-4
# small beams keep the tests short; ABM's L2R beam can run long, so its length is capped
DECODE = {"bttr": {"beam_size": 2}, "comer": {"beam_size": 2}, "hmer_mtl": {"beam_size": 2},
          "abm": {"beam_size": 2, "max_len": 40}, "posformer": {"beam_size": 2, "max_len": 40},
          "ical": {"beam_size": 2, "max_len": 40}, "can": {"beam_size": 2, "max_len": 40},
          "tamer": {"beam_size": 2, "max_len": 40}}
_EXPORTED: dict[str, Path] = {}


def exported(system: str, fixture: dict, tmp_path_factory) -> Path:
    if system not in _EXPORTED:
        _EXPORTED[system] = export_onnx(fixture["model"], tmp_path_factory.mktemp(f"{system}_onnx"))
    return _EXPORTED[system]


@pytest.mark.slow
@pytest.mark.parametrize("system", ["bttr", "comer", "hmer_mtl", "abm", "posformer", "ical", "can", "tamer"])
def test_onnxruntime_search_matches_pytorch(system, parity_dir, tmp_path_factory):
    fixture = system_fixture(parity_dir, system, tmp_path_factory)
    model = fixture["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    directory = exported(system, fixture, tmp_path_factory)
    # exporting leaves the model as it was (the exporter's mode switching once moved BatchNorm statistics)
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    files = {p.name for p in directory.iterdir()}
    assert {"encoder.onnx", "export.json", "vocab.json", "recipe.yaml"} <= files
    assert (("decoder_step_l2r.onnx" in files and "decoder_step_r2l.onnx" in files) if system == "abm"
            else "decoder_step.onnx" in files)

    images = sorted(fixture["dir"].glob("image*.png"))
    onnx_model = load_onnx_model(directory)
    if system == "tamer":  # the structure rescoring runs on graphs too: the scores below include it
        assert {"structure_l2r.onnx", "structure_r2l.onnx"} <= files
        assert model.recipe["decode"]["mode"] == "tamer" and onnx_model.decoder.rescorer is not None
    reference = model.recognize(images, **DECODE[system])
    found = onnx_model.recognize(images, **DECODE[system])
    for ref, got in zip(reference, found):
        assert got.tokens == ref.tokens and got.latex == ref.latex
        assert abs(got.score - ref.score) < SCORE_TOL
        assert [(h.direction, h.tokens, h.finished) for h in got.hypotheses] == \
            [(h.direction, h.tokens, h.finished) for h in ref.hypotheses]
        for a, b in zip(got.hypotheses, ref.hypotheses):
            assert abs(a.score - b.score) < SCORE_TOL and abs(a.search_score - b.search_score) < SCORE_TOL
    assert len(reference[0].tokens) > (3 if system in GOLDEN_SYSTEMS else 10)  # a formula, not an empty hypothesis


@pytest.mark.slow
def test_step_graph_batches_rows_of_different_images(parity_dir, tmp_path_factory):
    """Rows reading different, differently padded images in one step: the step graph's logits are
    ``decoder.step``'s (CoMER: the running coverage is carried through the graph's inputs and outputs)."""
    fixture = system_fixture(parity_dir, "comer", tmp_path_factory)
    model = fixture["model"]
    decoder = load_onnx_model(exported("comer", fixture, tmp_path_factory)).decoder
    with torch.no_grad():
        memory, mask = model.encode(fixture["images"], fixture["image_mask"])
        state = model.decoder.init_state(memory, mask, "l2r")
        onnx_state = decoder.init_state(memory, mask, "l2r")
        tokens = torch.tensor(fixture["tokens"][0][:6])
        last = torch.full((2,), model.vocab.sos_id)
        for t in range(6):
            expected, state = model.decoder.step(state, last)
            got, onnx_state = decoder.step(onnx_state, last)
            assert torch.allclose(got, expected, atol=1e-4), t
            rows = got.shape[0]
            if t == 2:  # from here on three rows: the second image, the first, the second again
                index = torch.tensor([1, 0, 1])
                state, onnx_state = model.decoder.reorder_state(state, index), decoder.reorder_state(onnx_state,
                                                                                                   index)
                rows = 3
            last = tokens[t].repeat(rows)


@pytest.mark.slow
def test_cli_export_then_predict_with_onnxruntime(parity_dir, tmp_path_factory, tmp_path, capsys):
    fixture = system_fixture(parity_dir, "bttr", tmp_path_factory)
    out = tmp_path / "onnx"
    assert main(["export", str(fixture["converted"]), "--format", "onnx", "--out", str(out)]) == 0
    capsys.readouterr()
    image = sorted(fixture["dir"].glob("image*.png"))[1]
    assert main(["predict", str(out), str(image), "--backend", "onnxruntime", "--json", "--beam", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = fixture["model"].recognize([image], beam_size=3)[0]
    assert line["tokens"] == expected.tokens and abs(line["score"] - expected.score) < SCORE_TOL
    # a model directory given to the onnxruntime backend is refused with what to do
    assert main(["predict", str(fixture["converted"]), str(image), "--backend", "onnxruntime"]) == 2
    assert "hmerzoo export" in capsys.readouterr().out


def test_missing_onnx_says_how_to_install(monkeypatch):
    import builtins

    from hmerzoo.errors import HmerzooError
    from hmerzoo.export import require_onnx

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(HmerzooError, match=r'onnxruntime, which is not installed: pip install "hmerzoo\[onnx\]"'):
        require_onnx()
