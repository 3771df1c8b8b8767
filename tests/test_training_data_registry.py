"""data.dataset and data.augment / data.transforms select registered datasets and transforms by name, with a
did-you-mean for a misspelt one (checked by validate_recipe, before anything runs)."""
from __future__ import annotations

import pytest
import torch

from hmerzoo.config import DataConfig
from hmerzoo.data import CrohmeDataset, build_dataloaders
from hmerzoo.data.transforms import Compose, ScaleToLimitRange
from hmerzoo.errors import RecipeError
from hmerzoo.recipe import load_recipe, validate_recipe
from hmerzoo.registry import DATASETS, TRANSFORMS
from hmerzoo.vocab import Vocabulary

OPENED: list[str] = []


@DATASETS.register("test_counting_crohme", override=True)
class CountingCrohme(CrohmeDataset):
    """CROHME that records which splits it opened."""

    def __init__(self, root, split, vocab, skip_bad=False, report=None):
        OPENED.append(str(split))
        super().__init__(root, split, vocab, skip_bad=skip_bad, report=report)


@TRANSFORMS.register("test_pad_right", override=True)
class PadRight:
    """Adds ``pixels`` columns of background on the right (deterministic; the generator is unused)."""

    def __init__(self, pixels: int = 3):
        self.pixels = pixels

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.nn.functional.pad(image, (0, self.pixels))


def test_unknown_dataset_and_transform_names_are_recipe_errors_with_suggestions():
    recipe = load_recipe("bttr", ["data.dataset=crohmee", "data.transforms=[scale_to_limitt]",
                                  "data.augment=[{type: scale_aug, low: 0.5}]"])
    with pytest.raises(RecipeError) as e:
        validate_recipe(recipe)
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert any(p.startswith("data.dataset: unknown dataset 'crohmee' (did you mean 'crohme'?)") for p in problems)
    assert any(p.startswith("data.transforms[0].type: unknown transform 'scale_to_limitt' (did you mean "
                            "'scale_to_limit'?)") for p in problems)
    assert any(p.startswith("data.augment[0].low: unknown argument") and "did you mean 'lo'" in p for p in problems)
    validate_recipe(load_recipe("bttr", ["data.dataset=test_counting_crohme", "data.transforms=[test_pad_right]",
                                         "data.augment=[{type: scale_aug, lo: 0.9, hi: 1.1}]"]))


def test_the_named_dataset_and_transforms_are_the_ones_used(sample_root):
    vocab = Vocabulary.from_dictionary(str(sample_root / "dictionary.txt"), ["<pad>", "<sos>", "<eos>"])
    OPENED.clear()
    common = dict(root=str(sample_root), val_split="2014", val_limit=4, train_limit=6, num_workers=0, batch_size=2)
    plain = build_dataloaders(DataConfig(**common), vocab, seed=0)
    named = build_dataloaders(DataConfig(dataset="test_counting_crohme", scale_to_limit=True,
                                         transforms=[{"type": "test_pad_right", "pixels": 5}], **common), vocab, seed=0)
    assert OPENED == ["train", "2014"]
    transform = named.train.dataset.transform
    assert isinstance(transform, Compose) and isinstance(transform.transforms[0], ScaleToLimitRange)
    assert isinstance(transform.transforms[1], PadRight) and transform.transforms[1].pixels == 5
    assert named.val.dataset.transform is transform  # validation images get the same deterministic transforms
    raw, transformed = plain.val.dataset[0], named.val.dataset[0]  # one bucket's samples, before padding
    assert [s.name for s in raw] == [s.name for s in transformed]
    for before, after in zip(raw, transformed):
        assert torch.equal(after.image, PadRight(5)(ScaleToLimitRange()(before.image)))
        assert after.image.shape[-1] == ScaleToLimitRange().output_size(*before.image.shape[-2:])[1] + 5
