"""A decoder defined outside the package, registered in its own module, trained from a recipe that imports it."""
import json
import subprocess
import sys
import textwrap

EXT = '''
import torch
import torch.nn as nn

from hmerzoo.decoders.base import SequenceDecoder
from hmerzoo.sequence import DecoderOutput, teacher_forcing_tensors
from hmerzoo.registry import DECODERS


@DECODERS.register("tiny_gru")
class TinyGRUDecoder(SequenceDecoder):
    """A GRU over token embeddings with mean-pooled image memory as its initial state (L2R only)."""

    def __init__(self, in_channels: int, vocab_size: int, pad_id: int, sos_id: int, eos_id: int, hidden: int = 32):
        super().__init__()
        self.d_model = hidden
        self.pad_id, self.sos_id, self.eos_id = pad_id, sos_id, eos_id
        self.init = nn.Linear(in_channels, hidden)
        self.embed = nn.Embedding(vocab_size, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, vocab_size)

    def _h0(self, memory, mask):
        valid = (~mask).flatten(1).unsqueeze(-1).float()
        pooled = (memory.flatten(1, 2) * valid).sum(1) / valid.sum(1).clamp_min(1)
        return torch.tanh(self.init(pooled)).unsqueeze(0)

    def teacher_forced(self, memory, mask, tokens, direction="l2r"):
        inp, out = teacher_forcing_tensors(tokens, direction, self.sos_id, self.eos_id, self.pad_id, memory.device)
        hidden, _ = self.gru(self.embed(inp), self._h0(memory, mask))
        return self.proj(hidden), out

    def forward(self, memory, mask, tokens):
        logits, targets = self.teacher_forced(memory, mask, tokens)
        return DecoderOutput(logits, targets, directions=["l2r"] * len(tokens))

    def init_state(self, memory, mask, direction="l2r"):
        return self._h0(memory, mask)

    def step(self, state, last_tokens):
        out, state = self.gru(self.embed(last_tokens).unsqueeze(1), state)
        return self.proj(out[:, 0]), state

    def reorder_state(self, state, index):
        return state[:, index]
'''


def test_external_decoder_trains_two_steps_from_recipe(tmp_path, sample_root):
    (tmp_path / "my_ext").mkdir()
    (tmp_path / "my_ext" / "__init__.py").write_text("")
    (tmp_path / "my_ext" / "tiny_gru.py").write_text(EXT)
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(f"""
        extends: bttr
        name: tiny_gru_run
        imports: [my_ext.tiny_gru]
        data: {{root: {sample_root}, val_holdout: 4, batch_size: 4, num_workers: 0}}
        model:
          encoder: {{type: densenet, growth_rate: 4, num_layers: 2}}
          neck: {{type: bttr_projection, d_model: 32}}
          decoder: {{type: tiny_gru, hidden: 24}}
        train: {{max_steps: 2, log_every: 1, val_every: 0, output_dir: {tmp_path / 'runs'}}}
    """))
    proc = subprocess.run([sys.executable, "-m", "hmerzoo", "train", "recipe.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(l) for l in (tmp_path / "runs" / "tiny_gru_run" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l and "step" in l]
    assert [l["step"] for l in steps][-2:] == [1, 2]
    assert all(l["loss"] > 0 for l in steps)
    # the trained model loads back through the same registry, importing the module from the saved recipe
    sys.path.insert(0, str(tmp_path))
    try:
        from hmerzoo import load_model

        model = load_model(tmp_path / "runs" / "tiny_gru_run")
        assert type(model.decoder).__name__ == "TinyGRUDecoder"
    finally:
        sys.path.remove(str(tmp_path))
