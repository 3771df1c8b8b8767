"""CAN (LBH1024/CAN): counting targets on hand-worked captions, parity with the official code on the reduced fixture
of tests/goldens/can/ (made by tools/gen_can_goldens.py), the full configuration's parameter count, the converter,
and a short training run of recipes/can.yaml."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hmerzoo
from hmerzoo.batch import Batch
from hmerzoo.builder import build_model
from hmerzoo.convert import convert, families_of
from hmerzoo.convert.can import convert_state_dict_can
from hmerzoo.errors import CheckpointError
from hmerzoo.heads.counting import CountingHead, counting_targets
from hmerzoo.sequence import DecoderOutput, teacher_forcing_tensors
from hmerzoo.vocab import Vocabulary
from parity_harness import step_logits

REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "goldens" / "can"
IMAGES = ["image0_UN19_1041_em_595.png", "image1_18_em_1.png"]
TOL = dict(atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# counting targets from captions
def _vocab(tokens: str) -> Vocabulary:
    return Vocabulary(["eos", "sos", *tokens.split()], roles={"sos": "sos", "eos": "eos"})


def test_counting_targets_by_hand() -> None:
    vocab = _vocab(r"x 2 = \sum \limits a 1 3 \frac \sqrt ^ _ { }")
    head = CountingHead(vocab)
    caption = r"x ^ { 2 } = \sum \limits _ { a = 1 } ^ { 3 } x _ { a } ^ { 2 }"
    got = head.targets([vocab.encode(caption), vocab.encode(r"\frac { 1 } { \sqrt { 2 } }")], "cpu")
    expected = {"x": 2, "2": 2, "=": 2, r"\sum": 1, r"\limits": 1, "a": 2, "1": 1, "3": 1}
    row0 = {vocab.tokens[i]: int(c) for i, c in enumerate(got[0].tolist()) if c}
    row1 = {vocab.tokens[i]: int(c) for i, c in enumerate(got[1].tolist()) if c}
    assert row0 == expected  # 6 braces pairs, 3 '^' and 2 '_' count for nothing
    assert row1 == {r"\frac": 1, "1": 1, r"\sqrt": 1, "2": 1}
    assert got.shape == (2, len(vocab)) and got.dtype == torch.float32
    # the official ignore list: eos 0, sos 1 and the structural ids (here 11-14)
    assert head.ignore_ids == [0, 1] + [vocab.token_to_id[t] for t in "^ _ { }".split()]
    assert counting_targets([[2, 2, 3]], 5, ignore_ids=[3]).tolist() == [[0, 0, 2, 0, 0]]
    # other vocabularies: <pad> is never counted either, and ignore_tokens replaces the structural set
    vocab2 = Vocabulary(["<pad>", "<sos>", "<eos>", "x", "^", "{", "}"])
    assert CountingHead(vocab2, ignore_tokens=["^"]).ignore_ids == [0, 1, 2, 4]


# ---------------------------------------------------------------------------------------------------------------
# parity with the official code (reduced configuration)
@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from PIL import Image
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("can")
    official = load_file(str(GOLDENS / "state_dict.safetensors"))
    # the official checkpoint format: utils.save_checkpoint's {'model': state_dict}, words_dict.txt beside it
    torch.save({"model": official}, tmp / "CAN_WordRate-0.9_ExpRate-0.5_1.pth")
    (tmp / "words_dict.txt").write_bytes((GOLDENS / "words_dict.txt").read_bytes())
    out = convert("can", tmp / "CAN_WordRate-0.9_ExpRate-0.5_1.pth", tmp / "model")
    golden = load_file(str(GOLDENS / "golden.safetensors"))
    images = [torch.tensor(np.array(Image.open(GOLDENS / name)), dtype=torch.float32)[None] / 255 for name in IMAGES]
    x = golden["input.images"]
    mask = torch.ones(len(images), *x.shape[2:], dtype=torch.bool)
    for i, image in enumerate(images):
        mask[i, :image.shape[1], :image.shape[2]] = False
    lengths = golden["input.labels_mask"].sum(1).long().tolist()
    tokens = [row[:n - 1] for row, n in zip(golden["input.labels"].tolist(), lengths)]  # without the eos
    return {"dir": out, "pth": tmp / "CAN_WordRate-0.9_ExpRate-0.5_1.pth", "model": hmerzoo.load_model(out), "golden": golden, "official": official, "images": images,
            "x": x, "mask": mask, "tokens": tokens, "meta": json.loads((GOLDENS / "meta.json").read_text())}


def test_converted_model(fixture: dict) -> None:
    model, meta = fixture["model"], fixture["meta"]
    assert model.vocab.tokens == (GOLDENS / "words_dict.txt").read_text().split()
    assert model.vocab.special_ids == {"pad_id": None, "sos_id": 1, "eos_id": 0}
    assert model.num_parameters() == meta["reduced_parameters"]
    assert list(model.heads) == ["counting"] and model.neck is None
    assert torch.equal(fixture["x"][0, 0, :144, :249], fixture["images"][0][0])  # the PNGs are the batch's images


def test_forward_parity(fixture: dict) -> None:
    model, golden = fixture["model"], fixture["golden"]
    with torch.no_grad():
        memory, mask = model.encode(fixture["x"], fixture["mask"])
        torch.testing.assert_close(memory, golden["features"], **TOL)
        out = model.decoder(memory, mask, fixture["tokens"])
        _, maps = model.decoder.counting.branches[0](memory, mask)
    counts = out.extras["counting"]
    torch.testing.assert_close(counts[0], golden["counting1"], **TOL)
    torch.testing.assert_close(counts[1], golden["counting2"], **TOL)
    torch.testing.assert_close(out.extras["count_vector"], golden["counting"], **TOL)
    torch.testing.assert_close(maps, golden["counting_maps1"], **TOL)
    # every position, padded ones included (their input is eos, as the official label padding)
    torch.testing.assert_close(out.logits, golden["logits"], **TOL)
    torch.testing.assert_close(out.extras["attention"], golden["alphas"], **TOL)
    # the official loss terms: counting exactly as the head computes it; the word loss is the official mean over
    # every position of the padded batch (padding targets eos), which hmerzoo's loss does not train
    batch = Batch(images=fixture["x"], image_mask=fixture["mask"], tokens=fixture["tokens"])
    counting = model.heads["counting"](out, batch)["counting"]
    torch.testing.assert_close(counting, golden["counting_loss"], **TOL)
    word = F.cross_entropy(out.logits.flatten(0, 1), golden["input.labels"].flatten())
    torch.testing.assert_close(word, golden["word_loss"], **TOL)


def test_single_image_parity_and_greedy_decoding(fixture: dict) -> None:
    model, golden = fixture["model"], fixture["golden"]
    for i, image in enumerate(fixture["images"]):
        mask = torch.zeros(1, *image.shape[1:], dtype=torch.bool)
        with torch.no_grad():
            memory, memory_mask = model.encode(image[None], mask)
            torch.testing.assert_close(memory, golden[f"single{i}.features"], **TOL)
            logits, _ = model.decoder.teacher_forced(memory, memory_mask, [fixture["tokens"][i]])
            _, counts = model.decoder.counting(memory, memory_mask)
        n = len(fixture["tokens"][i]) + 1
        torch.testing.assert_close(logits, golden[f"single{i}.logits"][:, :n], **TOL)
        torch.testing.assert_close(counts, golden[f"single{i}.counting"], **TOL)  # official: no mask at all
        # the official inference: greedy argmax until eos, one image at a time
        expected = golden[f"greedy{i}"].tolist()
        assert expected == fixture["meta"]["greedy"][i]["ids"]
        assert model.greedy(image[None], mask) == [expected]
        # the recipe's decoding (l2r, beam 1) is that greedy decoding
        result = model.recognize(image)[0]
        assert result.tokens == expected and result.latex == fixture["meta"]["greedy"][i]["latex"]
    assert fixture["meta"]["greedy"][1]["latex"] == r"\sqrt { 4 8 }"


def test_incremental_equals_teacher_forced_and_beam_search(fixture: dict) -> None:
    model, tokens = fixture["model"], fixture["tokens"]
    vocab = model.vocab
    with torch.no_grad():
        memory, mask = model.encode(fixture["x"], fixture["mask"])
        inputs, _ = teacher_forcing_tensors(tokens, "l2r", vocab.sos_id, vocab.eos_id, vocab.eos_id)
        stepped = step_logits(model.decoder, memory, mask, inputs, "l2r")
        reordered = step_logits(model.decoder, memory, mask, inputs, "l2r", reorder_at=3)
    torch.testing.assert_close(stepped, fixture["golden"]["logits"], **TOL)
    torch.testing.assert_close(reordered, fixture["golden"]["logits"], **TOL)
    # hmerzoo's beam search on the same decoder (an hmerzoo option: the official code has greedy decoding only)
    beam = model.recognize(fixture["images"][1], beam_size=5)[0]
    assert beam.latex == r"\sqrt { 4 8 }" and len(beam.hypotheses) >= 2
    with pytest.raises(ValueError, match="left to right"):
        model.decoder.init_state(memory, mask, "r2l")


# ---------------------------------------------------------------------------------------------------------------
# the full configuration, the converter
def _dictionary(tmp_path: Path, n: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    d = tmp_path / "dictionary.txt"
    d.write_text("\n".join(f"t{i}" for i in range(n)) + "\n")
    return d


def test_recipe_has_the_official_parameter_count(tmp_path: Path) -> None:
    meta = json.loads((GOLDENS / "meta.json").read_text())
    # 109 symbols + <eos>, <sos> = the official 111 classes (words_dict.txt)
    model = build_model(REPO / "recipes/can.yaml", [f"vocab.dictionary={_dictionary(tmp_path, 109)}"])
    assert model.vocab.special_ids == {"pad_id": None, "sos_id": 1, "eos_id": 0}
    assert model.num_parameters() == meta["full_default_configuration"]["parameters"] == 16_838_280


def test_converter_round_trip(fixture: dict, tmp_path: Path) -> None:
    official = fixture["official"]
    assert families_of(official) == ["can"]
    saved = hmerzoo.load_model(fixture["dir"]).state_dict()
    renamed = convert_state_dict_can(official)
    assert set(saved) == set(renamed)
    assert all(torch.equal(saved[k], renamed[k]) for k in renamed)
    # the CLI on the official .pth (words_dict.txt beside it)
    from hmerzoo.cli import main

    assert main(["convert", "can", str(fixture["pth"]), "--out", str(tmp_path / "cli")]) in (0, None)
    cli = hmerzoo.load_model(tmp_path / "cli").state_dict()
    assert all(torch.equal(cli[k], saved[k]) for k in saved)
    # .safetensors with the official keys, --dictionary given, DataParallel's 'module.' prefix accepted
    from safetensors.torch import save_file

    save_file({f"module.{k}": v for k, v in official.items()}, str(tmp_path / "can.safetensors"))
    out = convert("can", tmp_path / "can.safetensors", tmp_path / "m", dictionary=GOLDENS / "words_dict.txt")
    again = hmerzoo.load_model(out).state_dict()
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    # a dictionary of another size, a missing dictionary, another family's checkpoint
    small = tmp_path / "small_words.txt"
    small.write_text("eos\nsos\n" + "\n".join(f"t{i}" for i in range(20)) + "\n")
    with pytest.raises(CheckpointError, match="output classes"):
        convert("can", tmp_path / "can.safetensors", tmp_path / "m2", dictionary=small)
    with pytest.raises(CheckpointError, match="not a CAN dictionary"):
        convert("can", tmp_path / "can.safetensors", tmp_path / "m2", dictionary=_dictionary(tmp_path / "m2", 109))
    with pytest.raises(CheckpointError, match="no dictionary.txt beside it"):
        convert("can", tmp_path / "can.safetensors", tmp_path / "m3")
    save_file({"encoder1.conv1.weight": torch.zeros(1)}, str(tmp_path / "abm.safetensors"))
    with pytest.raises(CheckpointError, match="convert abm"):
        convert("can", tmp_path / "abm.safetensors", tmp_path / "m4", dictionary=GOLDENS / "words_dict.txt")


# ---------------------------------------------------------------------------------------------------------------
# training: recipes/can.yaml with a tiny model on a few CROHME images, through the CLI
TINY = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.decoder.hidden_size=16",
        "model.decoder.embed_dim=16", "model.decoder.attention_dim=16", "model.decoder.coverage_channels=8",
        "model.decoder.counting_channels=32"]


@pytest.mark.slow
def test_train_can_recipe(sample_root: Path, tmp_path: Path) -> None:
    from hmerzoo.cli import main

    run = tmp_path / "run"
    code = main(["train", str(REPO / "recipes/can.yaml"), f"data.root={sample_root}", "data.num_workers=0",
                 "data.val_holdout=2", "data.train_limit=4", "data.batch_size=2", "train.epochs=2",
                 "train.val_max_len=3", "train.log_every=1", "sched.warmup_steps=1", f"train.run_dir={run}", *TINY])
    assert code in (0, None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if any(k.endswith("counting") for k in r)]
    assert len(steps) == 4, f"the counting loss is not logged at every step: {records[:2]}"
    assert all(math.isfinite(v) and v > 0 for r in steps for k, v in r.items() if k.endswith("counting"))
    model = hmerzoo.load_model(run)
    assert model.vocab.eos_id == 0 and model.vocab.sos_id == 1 and "counting" in model.heads
    assert model.recognize(torch.rand(1, 40, 60), max_len=4)[0].latex is not None


# ---------------------------------------------------------------------------------------------------------------
# the counting head on any encoder: CoMER + counting (recipes/comer_count.yaml)
COMER_TINY = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.neck.d_model=32",
              "model.decoder.d_model=32", "model.decoder.num_layers=2", "model.decoder.dim_feedforward=64",
              "model.decoder.nhead=4", "model.decoder.dc=8", "model.heads.counting.channels=32"]


def test_own_counter_reads_the_memory_in_either_layout() -> None:
    vocab = _vocab(r"x 2 ^ { }")
    torch.manual_seed(0)
    head = CountingHead(vocab, counter="own", d_model=8, channels=16).eval()
    memory = torch.randn(2, 3, 5, 8)  # channels last, as a neck's output
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    batch = Batch(images=torch.zeros(2, 1, 48, 80), image_mask=torch.zeros(2, 48, 80, dtype=torch.bool),
                  tokens=[vocab.encode("x ^ { 2 }"), vocab.encode("x x")])
    out = DecoderOutput(logits=torch.zeros(2, 1, len(vocab)), targets=torch.zeros(2, 1, dtype=torch.long),
                        extras={"memory": memory, "memory_mask": mask})
    loss = head(out, batch)["counting"]
    counts = head.counting(memory.permute(0, 3, 1, 2), mask)[0]
    target = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 2, 0, 0, 0, 0]], dtype=torch.float32)
    expected = sum(F.smooth_l1_loss(c, target) for c in [*counts, (counts[0] + counts[1]) / 2])
    torch.testing.assert_close(loss, expected)
    out.extras["memory"] = memory.permute(0, 3, 1, 2)  # channels first: the same counts
    torch.testing.assert_close(head(out, batch)["counting"], expected)
    with pytest.raises(ValueError, match="no axis of 8 channels"):
        head(DecoderOutput(logits=out.logits, targets=out.targets,
                           extras={"memory": torch.randn(2, 4, 3, 5), "memory_mask": mask}), batch)


@pytest.mark.slow
def test_train_comer_count_recipe(sample_root: Path, tmp_path: Path) -> None:
    from hmerzoo.cli import main

    run = tmp_path / "run"
    code = main(["train", str(REPO / "recipes/comer_count.yaml"), f"data.root={sample_root}", "data.num_workers=0",
                 "data.val_holdout=2", "data.train_limit=4", "data.batch_size=2", "train.epochs=1",
                 "train.val_max_len=3", "train.log_every=1", f"train.run_dir={run}", *COMER_TINY])
    assert code in (0, None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if any(k.endswith("counting") for k in r)]
    assert len(steps) == 2 and all(math.isfinite(v) and v > 0 for r in steps for k, v in r.items()
                                   if k.endswith("counting"))
    model = hmerzoo.load_model(run)
    assert model.heads["counting"].counter == "own" and type(model.decoder).__name__ == "CoMERDecoder"


def test_listed(capsys) -> None:
    from hmerzoo.cli import main

    assert main(["list", "recipes"]) == 0
    recipes = capsys.readouterr().out
    assert re.search(r"[│|]\s*can\s*[│|]", recipes) and re.search(r"[│|]\s*comer_count\s*[│|]", recipes)
    assert main(["list", "heads"]) == 0
    assert "counting" in capsys.readouterr().out


def test_training_step_reads_the_host_once(sample_root: Path) -> None:
    """Like the shipped recipes (test_train_syncs.py): the decoder, counting module and counting head add no host
    sync to train_step's one read of the losses."""
    from benchmark_modules import load_benchmark
    from hmerzoo.builder import build_component
    from hmerzoo.recipe import load_recipe
    from hmerzoo.registry import OPTIMIZERS
    from hmerzoo.runtime import seed_everything
    from hmerzoo.training import train_step

    syncs = load_benchmark("syncs")
    seed_everything(0)
    recipe = load_recipe(REPO / "recipes/can.yaml", [f"data.root={sample_root}", *TINY])
    model = build_model(recipe, validate=False)
    batch = syncs.small_batch(sample_root, recipe, 3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_component(OPTIMIZERS, recipe["optim"], "optim", {"params": params})
    model.train()
    for step in (1, 2):  # the first is a warm-up
        with syncs.Counter() as counter:
            train_step(model, batch, optimizer, params, torch.device("cpu"), "fp32", grad_clip=100.0, step=step)
    assert counter.total <= 1, counter.summary()
    assert [e.where.split(":")[0] for e in counter.events if e.kind == "read"] == ["hmerzoo/training/step.py"]
