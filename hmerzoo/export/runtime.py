"""Running an ONNX export (:mod:`.onnx`) with onnxruntime: ``hmerzoo predict DIR --backend onnxruntime``.

:class:`OnnxDecoder` puts the exported init/step graphs behind the decoder step interface (``init_state`` /
``step`` / ``reorder_state``), so the search is :mod:`hmerzoo.decoding`'s own loop, modes and finishing rules, the
same code that drives the PyTorch decoders. The second passes of the bidirectional modes (``log_likelihood``,
``prefix_logits``) run the step graph over the given tokens, which gives the teacher-forced numbers (the step is
exact, see the decoders' incremental tests). The state lives in numpy arrays, one row per hypothesis: each image's
cross-attention keys/values are copied per row here, where the PyTorch decoders share them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..batch import pad_images
from ..decoders.base import SequenceDecoder
from ..decoding.modes import search
from ..decoding.recognize import decode_config, image_tensors
from ..errors import HmerzooError
from ..heads.tree_structure import TreeStructureHead
from ..model import Recognition
from ..sequence import direction_tokens
from ..vocab import Vocabulary
from .onnx import EXPORT_FILE, FORMAT_VERSION, require_onnx


@dataclass
class OnnxState:
    """Rows N are hypotheses. ``arrays``: every per-row input of the step graph by name; ``position``: the next
    input's position (transformers); ``direction``: the rows' direction (ABM: picks the branch's graphs)."""

    direction: str | list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    position: int = 0


class _StructureGraph:
    """One direction's exported structure module, called as the PyTorch module is: (hidden, pad) -> sim."""

    def __init__(self, session: Any):
        self.session = session

    def __call__(self, hidden: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        sim, = self.session.run(["sim"], {"hidden": _np(hidden.float()), "pad": _np(pad.bool())})
        return torch.from_numpy(sim)


class OnnxStructureScorer:
    """TAMER's rescorer over ONNX graphs: ``TreeStructureHead``'s own scoring code (targets from the LaTeX tree,
    similarity per direction, the official per-hypothesis score), with the decoder's teacher-forced states from
    stepping the step graph and the structure modules as graphs. Runs once per search, on the finished beams."""

    targets = TreeStructureHead.targets
    similarity = TreeStructureHead.similarity
    score_hypotheses = TreeStructureHead.score_hypotheses

    def __init__(self, tokens: list[str], sos_id: int, eos_id: int, pad_id: int | None, sessions: dict[str, Any]):
        self.tokens, self.sos_id, self.eos_id = tokens, sos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else 0
        self.l2r, self.r2l = _StructureGraph(sessions["l2r"]), _StructureGraph(sessions["r2l"])


class OnnxDecoder(SequenceDecoder):
    """The exported decoder graphs as a :class:`SequenceDecoder` for the search (no parameters of its own)."""

    memory_padding_invariant = False  # each image is encoded and searched alone
    shares_image_memory = False

    def __init__(self, spec: dict[str, Any], sessions: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.sessions = sessions
        self.family = spec["family"]
        self.vocab_size, self.sos_id, self.eos_id = spec["vocab_size"], spec["sos_id"], spec["eos_id"]
        self.pad_id = spec["pad_id"]
        self.directions = tuple(spec["directions"])
        self.supports_mixed_directions = bool(spec["supports_mixed_directions"])
        self.names = spec["names"]
        self._inputs = {key: {i.name for i in s.get_inputs()} for key, s in sessions.items()}

    def _run(self, key: str, outputs: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = self._inputs[key]  # the exporter leaves out inputs a graph does not read (BTTR: image_mask)
        values = self.sessions[key].run(outputs, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(outputs, values))

    def _graph(self, kind: str, direction: str) -> str:
        return f"{kind}_{direction}" if self.family == "abm" else kind

    # --- the step interface -------------------------------------------------------------------------------------
    def init_state(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                   direction: str | Sequence[str] = "l2r") -> OnnxState:
        directions = [direction] if isinstance(direction, str) else list(direction)
        for d in directions:
            direction_tokens(self.sos_id, self.eos_id, d)  # validates it
        if self.family == "abm":
            if len(set(directions)) != 1:
                raise ValueError("abm decoder: the two directions have their own weights; decode them in separate "
                                 f"batches (got directions {sorted(set(directions))})")
            direction = directions[0]
        feeds = {"memory": _np(memory), "memory_mask": _np(memory_mask.bool())}
        init = self._run(self._graph("init", directions[0]), self.names["init_out"], feeds)
        n = memory.shape[0]
        if self.family == "abm":
            arrays = {"hidden": init["hidden"], "keys": init["keys"], "memory": feeds["memory"],
                      "memory_mask": feeds["memory_mask"],
                      "coverage": np.zeros((n, *memory.shape[2:]), dtype=np.float32)}
            return OnnxState(direction=direction, arrays=arrays)
        if self.family == "can":
            arrays = {**init, "memory": feeds["memory"],
                      "coverage": np.zeros((n, *memory.shape[2:]), dtype=np.float32)}
            return OnnxState(direction="l2r", arrays=arrays)
        spec = self.spec
        arrays = dict(init)
        arrays["image_mask"] = feeds["memory_mask"]
        arrays["self_pad"] = np.zeros((n, 0), dtype=bool)
        empty = np.zeros((n, spec["nhead"], 0, spec["head_dim"]), dtype=np.float32)
        for i in range(spec["num_layers"]):
            arrays[f"self_k.{i}"] = arrays[f"self_v.{i}"] = empty
            if spec["coverage"]:
                positions = arrays["cross_valid"].shape[1]
                arrays[f"raw_sum.{i}"] = arrays[f"used_sum.{i}"] = np.zeros((n, spec["nhead"], positions), np.float32)
        if "output_heads" in spec:  # ICAL's SCCM key/value cache: empty before the first step
            arrays["sccm_k"] = arrays["sccm_v"] = np.zeros((n, spec["output_heads"], 0, spec["output_head_dim"]),
                                                          dtype=np.float32)
        return OnnxState(direction=direction if isinstance(direction, str) else directions, arrays=arrays)

    def step(self, state: OnnxState, last_tokens: torch.Tensor) -> tuple[torch.Tensor, OnnxState]:
        feeds = dict(state.arrays)
        feeds["tokens"] = _np(last_tokens.long())
        direction = state.direction if isinstance(state.direction, str) else state.direction[0]
        if self.family != "abm":
            feeds["position"] = np.array([state.position], dtype=np.int64)
        result = self._run(self._graph("step", direction), self.names["step_out"], feeds)
        arrays = dict(state.arrays)
        for name, value in result.items():
            if name.endswith(".out"):
                arrays[name[:-len(".out")]] = value
        new = OnnxState(direction=state.direction, arrays=arrays, position=state.position + 1)
        return torch.from_numpy(result["logits"]), new

    def reorder_state(self, state: OnnxState, index: torch.Tensor) -> OnnxState:
        rows = _np(index.long())
        return OnnxState(direction=state.direction, position=state.position,
                         arrays={k: np.take(v, rows, axis=0) for k, v in state.arrays.items()})

    # --- the second passes, by stepping -------------------------------------------------------------------------
    def prefix_logits(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor,
                      direction: str | Sequence[str] = "l2r") -> torch.Tensor:
        state = self.init_state(memory, memory_mask, direction)
        logits = []
        for t in range(inputs.shape[1]):
            out, state = self.step(state, inputs[:, t])
            logits.append(out)
        return torch.stack(logits, dim=1)

    def decode(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor,
               memory_index: Sequence[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A teacher-forced pass by stepping (rows read memory row ``memory_index[i]``): (logits [N,L,V], last
        layer's states [N,L,d]); the step graph returns the states only where a structure rescorer needs them."""
        if memory_index is not None:
            index = torch.as_tensor(memory_index, dtype=torch.long)
            memory, memory_mask = memory.index_select(0, index), memory_mask.index_select(0, index)
        state = self.init_state(memory, memory_mask, "l2r")
        logits, hidden = [], []
        for t in range(inputs.shape[1]):
            feeds = dict(state.arrays)
            feeds["tokens"] = _np(inputs[:, t].long())
            feeds["position"] = np.array([state.position], dtype=np.int64)
            result = self._run("step", self.names["step_out"], feeds)
            arrays = dict(state.arrays)
            arrays.update({k[:-len(".out")]: v for k, v in result.items() if k.endswith(".out")})
            state = OnnxState(direction=state.direction, arrays=arrays, position=state.position + 1)
            logits.append(torch.from_numpy(result["logits"]))
            hidden.append(torch.from_numpy(result["hidden"]))
        return torch.stack(logits, 1), torch.stack(hidden, 1)

    def log_likelihood(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r", memory_index: torch.Tensor | None = None) -> torch.Tensor:
        if memory_index is not None:
            memory, memory_mask = memory.index_select(0, memory_index), memory_mask.index_select(0, memory_index)
        start, stop = direction_tokens(self.sos_id, self.eos_id, direction)
        bodies = [list(seq)[::-1] if direction == "r2l" else list(seq) for seq in tokens]
        length = max(len(b) for b in bodies) + 1
        # inputs: start token, then the tokens; targets: the tokens, then the stop token; -1 past a row's end
        inputs = torch.full((len(bodies), length), stop, dtype=torch.long)
        targets = torch.full((len(bodies), length), -1, dtype=torch.long)
        inputs[:, 0] = start
        for i, body in enumerate(bodies):
            if body:
                inputs[i, 1:1 + len(body)] = torch.tensor(body)
                targets[i, :len(body)] = torch.tensor(body)
            targets[i, len(body)] = stop
        logp = F.log_softmax(self.prefix_logits(memory, memory_mask, inputs, direction).float(), dim=-1)
        picked = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return (picked * (targets >= 0)).sum(-1)


class OnnxModel:
    """An ONNX export loaded for recognition: ``recognize`` as :meth:`hmerzoo.HMERModel.recognize` (each image
    encoded and searched alone), ``vocab``, ``recipe``, ``encode``, and ``decoder`` (:class:`OnnxDecoder`)."""

    training = False

    def __init__(self, directory: str | Path, providers: Sequence[str] | None = None, threads: int | None = None):
        require_onnx()
        import onnxruntime as ort
        import yaml

        self.directory = Path(directory)
        spec_path = self.directory / EXPORT_FILE
        if not spec_path.is_file():
            raise HmerzooError(f"{self.directory}: no {EXPORT_FILE}; --backend onnxruntime needs a directory written "
                               "by 'hmerzoo export MODEL --format onnx --out DIR'")
        self.spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if self.spec.get("format") != FORMAT_VERSION:
            raise HmerzooError(f"{spec_path}: export format {self.spec.get('format')}, this hmerzoo reads "
                               f"{FORMAT_VERSION}; export the model again")
        self.vocab = Vocabulary.load(str(self.directory / "vocab.json"))
        self.recipe = yaml.safe_load((self.directory / "recipe.yaml").read_text(encoding="utf-8")) or {}
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])

        def session(name: str) -> Any:
            return ort.InferenceSession(str(self.directory / name), options, providers=providers)

        self.encoder = session(self.spec["encoder"])
        graphs = self.spec["graphs"]
        sessions = {}
        if self.spec["family"] == "abm":
            for direction, files in graphs.items():
                sessions[f"init_{direction}"], sessions[f"step_{direction}"] = session(files["init"]), \
                    session(files["step"])
        else:
            sessions["init"], sessions["step"] = session(graphs["init"]), session(graphs["step"])
        self.decoder = OnnxDecoder(self.spec, sessions)
        if "structure" in self.spec:  # TAMER: the structure rescorer of decode.mode tamer
            self.decoder.rescorer = OnnxStructureScorer(
                list(self.vocab.tokens), self.vocab.sos_id, self.vocab.eos_id, self.vocab.pad_id,
                {d: session(f) for d, f in self.spec["structure"].items()})

    # what callers written for HMERModel ask of it
    def parameters(self) -> Iterator[torch.Tensor]:
        """One empty CPU tensor: callers find the device (the CPU: inputs go to onnxruntime through numpy)."""
        yield torch.zeros(0)

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        return self

    def encode(self, images: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory, mask = self.encoder.run(["memory", "memory_mask"], {"images": _np(images.float()),
                                                                      "image_mask": _np(image_mask.bool())})
        return torch.from_numpy(memory), torch.from_numpy(mask)

    @torch.no_grad()
    def recognize(self, images: Sequence[Any] | Any, beam_size: int | None = None, max_len: int | None = None,
                  alpha: float | None = None, mode: str | None = None, batching: str | None = None,
                  batch_size: int | None = None) -> list[Recognition]:
        """As ``HMERModel.recognize``; ``batching``/``batch_size`` are accepted and ignored (always per image)."""
        config = decode_config(self.recipe, beam_size=beam_size, max_len=max_len, alpha=alpha, mode=mode)
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for tensor in image_tensors(images, self.recipe):
            x, m = pad_images([tensor.cpu()])
            memory, mask = self.encode(x, m)
            result = search(self.decoder, memory, mask, config, sos_id=self.vocab.sos_id, eos_id=self.vocab.eos_id,
                            pad_id=self.vocab.pad_id)[0]
            out.append(Recognition(latex=self.vocab.to_latex(result.best.tokens), tokens=list(result.best.tokens),
                                   score=result.best_score, hypotheses=result.hypotheses))
        return out


def load_onnx_model(directory: str | Path, threads: int | None = None) -> OnnxModel:
    return OnnxModel(directory, threads=threads)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())
