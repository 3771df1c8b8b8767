"""Where the data comes from when the recipe names no data.root: the override, $HMERZOO_DATA, the checkout's
data/crohme, the user cache, else an error naming `hmerzoo data fetch crohme`; and the small-data holdout."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import hmerzoo.config as config
from hmerzoo.builder import vocab_from_recipe
from hmerzoo.config import DataConfig, holdout_size, resolve_data_root, resolve_dictionary
from hmerzoo.data import build_dataloaders
from hmerzoo.errors import DataError
from hmerzoo.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HMERZOO_DATA", raising=False)
    monkeypatch.setenv("HMERZOO_HOME", str(tmp_path / "home"))


def _root(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "dictionary.txt").write_text("a\nb\n")
    return path


def test_resolution_order(no_env, monkeypatch, tmp_path):
    # a checkout: the repository's data/crohme, found beside the package source
    assert resolve_data_root() == str(REPO / "data" / "crohme")
    assert Path(resolve_data_root()).samefile(config.repo_data_root())
    # the recipe/override wins over everything, $HMERZOO_DATA over the defaults
    monkeypatch.setenv("HMERZOO_DATA", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "given")) == str(tmp_path / "given")
    assert resolve_data_root() == str(tmp_path / "env")
    monkeypatch.delenv("HMERZOO_DATA")
    # an installed package (no data/crohme beside it): the user cache under $HMERZOO_HOME
    monkeypatch.setattr(config, "repo_data_root", lambda: tmp_path / "site-packages" / "data" / "crohme")
    cache = _root(tmp_path / "home" / "datasets" / "crohme")
    assert resolve_data_root() == str(cache)
    assert resolve_dictionary(None, None) == str(cache / "dictionary.txt")
    assert resolve_dictionary("~/d.txt", None) == str(Path.home() / "d.txt")


def test_default_home_is_the_user_cache(monkeypatch):
    monkeypatch.delenv("HMERZOO_HOME", raising=False)
    assert config.user_data_root() == Path.home() / ".cache" / "hmerzoo" / "datasets" / "crohme"


def test_nothing_found_names_the_fetch_command(no_env, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "repo_data_root", lambda: tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"hmerzoo data fetch crohme") as e:
        resolve_data_root()
    assert str(tmp_path / "nowhere") in str(e.value) and str(tmp_path / "home") in str(e.value)
    with pytest.raises(DataError, match=r"hmerzoo data fetch crohme"):
        vocab_from_recipe({"vocab": {}, "data": {}})


def test_vocabulary_defaults_to_the_repository_dictionary(no_env):
    vocab = vocab_from_recipe({"vocab": {}, "data": {"root": None}})
    assert len(vocab) == 113 and vocab.tokens[:4] == ["<pad>", "<sos>", "<eos>", "!"]


@pytest.mark.parametrize("holdout, num, expected", [(None, 8835, 500), (None, 64, 6), (None, 9, 0), (0, 64, 0),
                                                    (12, 64, 12), (None, 4999, 499), (None, 5000, 500)])
def test_holdout_size(holdout, num, expected):
    assert holdout_size(holdout, num) == expected


def test_default_holdout_works_on_a_tiny_set(sample_root):
    vocab = Vocabulary.from_dictionary(str(sample_root / "dictionary.txt"))
    bundle = build_dataloaders(DataConfig(root=str(sample_root), num_workers=0), vocab, seed=3)
    assert bundle.num_val_samples == 6  # 10% of 64
    assert bundle.num_train_samples + bundle.report.num_filtered == 58
    with pytest.raises(DataError, match="val_holdout=64 leaves no training samples"):
        build_dataloaders(DataConfig(root=str(sample_root), val_holdout=64, num_workers=0), vocab, seed=3)
    assert DataConfig(val_holdout=None).val_holdout is None
    with pytest.raises(ValueError, match=r"data.val_holdout: must be >= 0 or null"):
        DataConfig(val_holdout=-1)


@pytest.mark.slow  # ~45 s on 2 shared CPU cores: reading train.zip's 8,835 headers, 2 steps, 1 validation
def test_train_without_a_data_argument(no_env, tmp_path):
    from hmerzoo.cli import main

    run = tmp_path / "run"
    start = time.perf_counter()
    code = main(["train", str(REPO / "recipes/abm.yaml"), "train.max_steps=2", f"train.run_dir={run}",
                 "data.num_workers=0", "data.train_limit=4", "data.val_limit=2", "data.batch_size=2",
                 "train.val_max_len=3"])
    assert code in (0, None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in records) == 2
    import hmerzoo

    assert len(hmerzoo.load_model(run).vocab) == 112  # data/crohme's 110 tokens + ABM's <sos> <eos>
    # eval with no --data and no --split: the three test years of the same default root
    assert main(["eval", str(run), "--limit", "1", "--beam", "1", "--max-len", "3", "--device", "cpu"]) in (0, None)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert Path(summary["data"]) == (REPO / "data" / "crohme").resolve()
    assert list(summary["splits"]) == ["2014", "2016", "2019"]
    print(f"trained 2 steps on data/crohme in {time.perf_counter() - start:.1f}s")
