"""ABM's components without the parity fixtures: vocabulary conventions, decoder contract, losses, the plateau
scheduler's early stop, and a short training run of recipes/abm.yaml."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hmerzoo.batch import Batch
from hmerzoo.builder import build_model
from hmerzoo.decoders.abm import ABMDecoder
from hmerzoo.errors import DataError, HmerzooError, RecipeError
from hmerzoo.heads.mutual_distillation import MutualDistillation
from hmerzoo.layers.attention_aggregation import AttentionAggregation
from hmerzoo.losses import SequenceCrossEntropy
from hmerzoo.optim import Plateau
from hmerzoo.sequence import IGNORE_INDEX, DecoderOutput
from hmerzoo.vocab import Vocabulary
from parity_harness import step_logits

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# vocabulary: ABM's dictionary format and conventions
def test_token_id_dictionary(tmp_path: Path) -> None:
    d = tmp_path / "dictionary.txt"
    d.write_text("eos\t1\nsos\t0\nx\t3\n+\t2\n")  # ids give the order, not the lines
    vocab = Vocabulary.from_dictionary(str(d), [], roles={"sos": "sos", "eos": "eos"})
    assert vocab.tokens == ["sos", "eos", "+", "x"]
    assert vocab.special_ids == {"pad_id": None, "sos_id": 0, "eos_id": 1}
    assert vocab.to_latex([0, 3, 2, 3, 1]) == "x + x"
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    d.write_text("sos 0\neos 1\nx 3\n")
    with pytest.raises(DataError, match="id 2 is missing"):
        Vocabulary.from_dictionary(str(d), [], roles={"sos": "sos", "eos": "eos"})
    d.write_text("sos 0\neos 0\n")
    with pytest.raises(DataError, match="already used"):
        Vocabulary.from_dictionary(str(d), [])
    d.write_text("sos 0\neos 1\n")
    with pytest.raises(DataError, match="sos token '<sos>' is missing"):
        Vocabulary.from_dictionary(str(d), [])  # roles default to <sos>/<eos>


def _dictionary(tmp_path: Path, n: int) -> Path:
    d = tmp_path / "dictionary.txt"
    d.write_text("\n".join(f"t{i}" for i in range(n)) + "\n")
    return d


def test_recipe_builds_abm_with_the_official_size(tmp_path: Path) -> None:
    # 111 symbols + <sos>, <eos> = ABM's 113 classes; no <pad>
    model = build_model(REPO / "recipes/abm.yaml", [f"vocab.dictionary={_dictionary(tmp_path, 111)}"])
    assert model.vocab.special_ids == {"pad_id": None, "sos_id": 0, "eos_id": 1}
    assert model.num_parameters() == 8_428_988
    assert set(model.heads) == {"distill"} and model.neck is None
    # a dictionary that lists its own specials, read in ABM's way from the recipe
    abm_dict = tmp_path / "abm_dictionary.txt"
    abm_dict.write_text("sos\t0\neos\t1\n" + "".join(f"t{i}\t{i + 2}\n" for i in range(111)))
    model = build_model(REPO / "recipes/abm.yaml", [f"vocab.dictionary={abm_dict}", "vocab.specials=[]",
                                                    "vocab.roles={sos: sos, eos: eos}"])
    assert model.vocab.tokens[:3] == ["sos", "eos", "t0"] and model.num_parameters() == 8_428_988


# ---------------------------------------------------------------------------------------------------------------
# decoder
def _tiny_decoder(**kwargs: object) -> ABMDecoder:
    torch.manual_seed(0)
    options = dict(in_channels=12, vocab_size=9, sos_id=0, eos_id=1, hidden_size=16, embed_dim=8, attention_dim=10,
                   coverage_channels=6, coverage_kernels=(5, 3), dropout=0.2)
    options.update(kwargs)
    return ABMDecoder(**options)


def _tiny_memory() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    memory = torch.randn(3, 12, 4, 6)
    mask = torch.zeros(3, 4, 6, dtype=torch.bool)
    mask[1, :, 4:] = True
    mask[2, 2:, :] = True
    return memory, mask


def test_official_initialisation() -> None:
    decoder = ABMDecoder(in_channels=684, vocab_size=113, sos_id=0, eos_id=1)
    # Kaiming-uniform (gain sqrt 2): bound sqrt(6 / fan_in); Xavier-uniform: sqrt(6 / (fan_in + fan_out)),
    # per gate for the packed GRU matrices (the official layers are 256 x 256)
    l2r_gate, r2l_gate = decoder.l2r.gru1_hidden.weight[:256], decoder.r2l.gru1_hidden.weight[:256]
    assert l2r_gate.abs().max() <= math.sqrt(6 / 256) and l2r_gate.abs().max() > 0.9 * math.sqrt(6 / 256)
    assert r2l_gate.abs().max() <= math.sqrt(6 / 512) and r2l_gate.abs().max() > 0.9 * math.sqrt(6 / 512)
    assert float(decoder.r2l.gru2_hidden.bias.detach().abs().max()) == 0.0
    # the R2L output layer keeps Kaiming (train.py re-initialises only init_GRU_model2, emb_model2, gru_model2)
    classifier = decoder.r2l.output.classifier.weight
    assert classifier.abs().max() > 0.9 * math.sqrt(6 / 128)
    # embeddings keep PyTorch's N(0, 1)
    assert 0.9 < float(decoder.l2r.embedding.weight.detach().std()) < 1.1
    with pytest.raises(ValueError, match="directions"):
        ABMDecoder(in_channels=8, vocab_size=5, sos_id=0, eos_id=1, directions=["up"])


def test_fused_coverage_equals_the_official_order() -> None:
    torch.manual_seed(0)
    aam = AttentionAggregation(in_channels=12, hidden_size=16, attention_dim=10, coverage_channels=6,
                               coverage_kernels=(11, 5))
    coverage = torch.rand(2, 7, 9)
    torch.testing.assert_close(aam.coverage_features(coverage), aam.unfused_coverage_features(coverage),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        AttentionAggregation(in_channels=4, hidden_size=4, coverage_kernels=(4,))


def test_training_forward_and_backward() -> None:
    decoder = _tiny_decoder().train()
    memory, mask = _tiny_memory()
    memory.requires_grad_(True)
    tokens = [[3, 4, 5], [6], []]
    out = decoder(memory, mask, tokens)
    assert out.logits.shape == (6, 4, 9) and out.hidden.shape == (6, 4, 16)
    assert out.extras["attention"].shape == (6, 4, 4, 6)
    assert out.directions == ["l2r"] * 3 + ["r2l"] * 3
    assert out.targets[:3].tolist() == [[3, 4, 5, 1], [6, 1, -100, -100], [1, -100, -100, -100]]
    assert out.targets[3:].tolist() == [[5, 4, 3, 0], [6, 0, -100, -100], [0, -100, -100, -100]]
    # attention never looks at padding, and sums to one
    attention = out.extras["attention"].detach()
    assert float(attention[[1, 4]][..., 4:].abs().max()) == 0.0
    torch.testing.assert_close(attention.sum((2, 3)), torch.ones(6, 4))
    loss = F.cross_entropy(out.logits.reshape(-1, 9), out.targets.reshape(-1))
    loss.backward()
    assert torch.isfinite(memory.grad).all()
    assert float(memory.grad[1, :, :, 4:].abs().max()) == 0.0  # padded positions get no gradient


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_teacher_forced(direction: str) -> None:
    decoder = _tiny_decoder().eval()
    memory, mask = _tiny_memory()
    tokens = [[3, 4, 5, 6, 7], [8, 2], [3]]
    with torch.no_grad():
        teacher, targets = decoder.teacher_forced(memory, mask, tokens, direction)
        inputs, _ = decoder._teacher_forcing(tokens, direction, memory.device)
        stepped = step_logits(decoder, memory, mask, inputs, direction, reorder_at=2)  # rows reordered at step 2
    valid = targets != IGNORE_INDEX
    torch.testing.assert_close(stepped[valid], teacher[valid], atol=1e-5, rtol=1e-5)


def test_padded_memory_decodes_like_the_image_alone() -> None:
    """Masked mean, masked attention and zero coverage outside the image: padding changes nothing."""
    decoder = _tiny_decoder().eval()
    memory, _ = _tiny_memory()
    alone = memory[:1, :, :3, :4]
    padded = torch.zeros(1, 12, 4, 6)
    padded[:, :, :3, :4] = alone
    pad_mask = torch.ones(1, 4, 6, dtype=torch.bool)
    pad_mask[:, :3, :4] = False
    tokens = [[3, 4, 5]]
    with torch.no_grad():
        a, _ = decoder.teacher_forced(alone, torch.zeros(1, 3, 4, dtype=torch.bool), tokens, "r2l")
        b, _ = decoder.teacher_forced(padded, pad_mask, tokens, "r2l")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_directions_and_single_branch() -> None:
    decoder = _tiny_decoder(directions=["l2r"]).eval()
    memory, mask = _tiny_memory()
    assert decoder.r2l is None
    out = decoder(memory, mask, [[3], [4], [5]])
    assert out.directions == ["l2r"] * 3
    with pytest.raises(ValueError, match="no 'r2l' branch"):
        decoder.init_state(memory, mask, "r2l")
    with pytest.raises(RecipeError, match="no r2l rows"):
        MutualDistillation()(out, None)
    with pytest.raises(ValueError, match="separate"):
        _tiny_decoder().init_state(memory, mask, ["l2r", "r2l", "l2r"])


def test_reorder_state_duplicates_rows() -> None:
    decoder = _tiny_decoder().eval()
    memory, mask = _tiny_memory()
    with torch.no_grad():
        state = decoder.init_state(memory, mask, "l2r")
        _, state = decoder.step(state, torch.tensor([0, 0, 0]))
        beams = decoder.reorder_state(state, torch.tensor([0, 0, 2]))  # keep image 0 twice
        next_logits, _ = decoder.step(beams, torch.tensor([3, 4, 5]))
        alone, _ = decoder.step(decoder.reorder_state(state, torch.tensor([0])), torch.tensor([4]))
    torch.testing.assert_close(next_logits[1:2], alone)


# ---------------------------------------------------------------------------------------------------------------
# losses
def _output(logits: torch.Tensor, targets: torch.Tensor, directions: list[str]) -> DecoderOutput:
    return DecoderOutput(logits=logits, targets=targets, directions=directions)


def test_sequence_cross_entropy_weighs_samples_equally() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5)
    targets = torch.tensor([[1, 2, 3], [4, -100, -100], [0, 1, 2], [3, -100, -100]])
    loss = SequenceCrossEntropy()(_output(logits, targets, ["l2r", "l2r", "r2l", "r2l"]), None)
    token = F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1), reduction="none").view(4, 3)
    per_sample = torch.stack([token[0].mean(), token[1, 0], token[2].mean(), token[3, 0]])
    expected = per_sample[:2].mean() + per_sample[2:].mean()  # CE_L2R + CE_R2L
    torch.testing.assert_close(loss, expected)


def _two_branch_output(lengths: list[int], vocab: int = 6) -> DecoderOutput:
    torch.manual_seed(0)
    steps = max(lengths) + 1
    targets = torch.full((len(lengths), steps), IGNORE_INDEX)
    for i, n in enumerate(lengths):
        targets[i, :n + 1] = torch.randint(0, vocab, (n + 1,))
    logits = torch.randn(2 * len(lengths), steps, vocab, requires_grad=True)
    return _output(logits, torch.cat((targets, targets)), ["l2r"] * len(lengths) + ["r2l"] * len(lengths))


def _kl(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    p = F.softmax(teacher / t, -1)
    return (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t


def test_official_pairing_interleaves_the_batch() -> None:
    """Samples of length 3 and 1 (T = 4): train.py pairs rows in (time, sample) order, so with mixed lengths a
    row can meet another sample's row - reproduced here, pair by pair."""
    out = _two_branch_output([3, 1])
    l2r, r2l = out.logits[:2], out.logits[2:]
    # L2R rows [1:]: (t1,b0) (t1,b1) (t2,b0) (t3,b0); R2L [1:] flipped (t' = 3 - s): (s0,b0)=t'3 (s1,b0)=t'2
    # (s2,b0)=t'1 (s2,b1)=t'1
    teacher = torch.stack([l2r[0, 1], l2r[1, 1], l2r[0, 2], l2r[0, 3]])
    student = torch.stack([r2l[0, 3], r2l[0, 2], r2l[0, 1], r2l[1, 1]])
    head = MutualDistillation(weight=0.5, temperature=4.0)
    loss = head(out, None)
    torch.testing.assert_close(loss, 0.5 * _kl(teacher, student, 4.0))
    loss.backward()  # nothing detached: both branches learn
    assert out.logits.grad[:2].abs().sum() > 0 and out.logits.grad[2:].abs().sum() > 0


def test_target_pairing_and_weight_zero() -> None:
    out = _two_branch_output([3, 1])
    l2r, r2l = out.logits[:2], out.logits[2:]
    # steps predicting the same caption token: L2R t <-> R2L n-1-t
    teacher = torch.stack([l2r[0, 0], l2r[0, 1], l2r[0, 2], l2r[1, 0]])
    student = torch.stack([r2l[0, 2], r2l[0, 1], r2l[0, 0], r2l[1, 0]])
    loss = MutualDistillation(weight=1.0, temperature=2.0, pairing="target")(out, None)
    torch.testing.assert_close(loss, _kl(teacher, student, 2.0))
    assert float(MutualDistillation(weight=0.0)(out, None)) == 0.0
    with pytest.raises(RecipeError, match="pairing"):
        MutualDistillation(pairing="nearest")


# ---------------------------------------------------------------------------------------------------------------
# the schedule: halve on plateaus at most N times, then stop
def test_plateau_max_reductions_then_stop() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adadelta([param], lr=1.0)
    sched = Plateau(optimizer, monitor="val/loss", mode="min", factor=0.5, patience=1, threshold=0.0,
                    max_reductions=2)
    lrs = []
    for _ in range(9):
        sched.step({"val/loss": 1.0})  # never improves after the first
        lrs.append(sched.lrs[0])
        if sched.should_stop:
            break
    # bad validations 1, 2 (> patience: halve), 1, 2 (halve), 1, 2 (the third plateau: stop, lr unchanged)
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert sched.should_stop and sched.num_reductions == 2
    restored = Plateau(torch.optim.Adadelta([param], lr=1.0), monitor="val/loss", mode="min", max_reductions=2)
    restored.load_state_dict(sched.state_dict())
    assert restored.should_stop and restored.num_reductions == 2
    with pytest.raises(HmerzooError, match="max_reductions"):
        Plateau(optimizer, max_reductions=-1)


# ---------------------------------------------------------------------------------------------------------------
# training on the CROHME sample through the CLI: runs on CPU, and the plateau's stop ends the run
def test_train_abm_recipe_on_cpu_stops_early(sample_root: Path, tmp_path: Path) -> None:
    from hmerzoo.cli import main

    run = tmp_path / "run"
    code = main(["train", str(REPO / "recipes/abm.yaml"), f"data.root={sample_root}", "data.num_workers=0",
                 "data.val_holdout=2", "data.train_limit=2", "data.batch_size=2", "train.epochs=5",
                 "train.val_max_len=3", f"train.run_dir={run}",
                 # never "better" after the first validation, so the 2nd validation is a plateau: stop at once
                 "sched.patience=0", "sched.threshold=1000000000.0", "sched.threshold_mode=abs", "sched.max_reductions=0"])
    assert code in (0, None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val/loss" in r]
    assert len(validations) == 2 and validations[-1]["epoch"] == 1  # stopped after epoch 2 of 5
    assert all(math.isfinite(r["val/loss"]) for r in validations)
    import hmerzoo

    model = hmerzoo.load_model(run)
    assert model.vocab.pad_id is None and model.vocab.sos_id == 0
    image = torch.rand(1, 40, 60)
    assert model.recognize(image, max_len=4, beam_size=2)[0].latex is not None
