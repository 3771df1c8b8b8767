"""DataLoaders of padded :class:`~hmerzoo.batch.Batch` es over pre-built buckets (BTTR/CoMER style).

Each DataLoader item is one whole bucket (``batch_size=1`` over buckets, a collate that unwraps and pads), so the
composition of every batch is fixed once and an epoch only reorders buckets.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..batch import Batch, pad_images
from ..config import DataConfig, holdout_size, resolve_data_root
from ..errors import DataError, RecipeError
from ..registry import TRANSFORMS
from ..vocab import Vocabulary
from .bucketing import make_buckets
from .crohme import SKIP_HINT, CrohmeDataset, Sample
from .formats import dataset_class
from .report import DataReport
from .sampler import (TAG_AUGMENT, TAG_HOLDOUT, TAG_TRAIN_LIMIT, TAG_VAL_LIMIT, BucketSampler, EpochTaggedSampler,
                      seeded_generator)
from .transforms import Compose, ScaleAugmentation, ScaleToLimitRange

TAG_LOADER = 6

Transform = Callable[..., torch.Tensor]


class BucketDataset(Dataset):
    """``dataset[bucket]`` or ``dataset[(epoch, bucket)]`` -> the list of that bucket's :class:`Sample` s.

    ``augment`` (training only) draws from a generator seeded by (seed, epoch, bucket), so the images of a bucket
    depend on nothing else: not on the worker that loads it, not on what ran before (resume sees the same images).
    ``transform`` (deterministic, e.g. ScaleToLimitRange) runs after ``augment``, the order CoMER uses.
    """

    def __init__(self, dataset: CrohmeDataset, buckets: list[list[int]], transform: Transform | None = None,
                 augment: Transform | None = None, seed: int = 0, skip_bad: bool = False):
        self.dataset = dataset
        self.buckets = buckets
        self.transform = transform
        self.augment = augment
        self.seed = seed
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.buckets)

    @property
    def num_samples(self) -> int:
        return sum(len(b) for b in self.buckets)

    @property
    def report(self) -> DataReport:
        return self.dataset.report

    def __getitem__(self, index: int | tuple[int, int]) -> list[Sample]:
        epoch, bucket = index if isinstance(index, tuple) else (0, index)
        generator = seeded_generator(self.seed, TAG_AUGMENT, epoch, bucket) if self.augment is not None else None
        samples = []
        for i in self.buckets[bucket]:
            record = self.dataset.samples[i]
            try:
                image = self.dataset.load_image(i)
            except DataError as e:
                # The header read when the split was opened, but the pixels do not decode. Counting happens only
                # in this process (workers' reports do not travel back), so say it here too.
                if not self.skip_bad:
                    raise DataError(f"{e}{SKIP_HINT}") from None
                warnings.warn(f"skipping a bad sample: {e}", stacklevel=2)
                self.dataset.report.add(self.dataset.split, "unreadable image", str(e))
                continue
            if self.augment is not None:
                image = self.augment(image, generator)
            if self.transform is not None:
                image = self.transform(image)
            samples.append(Sample(record.name, image, list(record.ids)))
        if not samples:
            raise DataError(f"{self.dataset.caption_where}: every image of bucket {bucket} failed to load")
        return samples


def collate_bucket(items: list[list[Sample]], pad_multiple: int = 1) -> Batch:
    """DataLoader collate for batch_size=1 over buckets: unwrap the one bucket and pad it (its height and width
    rounded up to a multiple of ``pad_multiple``, data.pad_multiple)."""
    if len(items) != 1:
        raise ValueError(f"collate_bucket expects one bucket per DataLoader item (batch_size=1), got {len(items)}")
    samples = items[0]
    images, image_mask = pad_images([s.image for s in samples], pad_multiple)
    return Batch(images=images, image_mask=image_mask, tokens=[s.ids for s in samples],
                 names=[s.name for s in samples])


@dataclasses.dataclass
class DataBundle:
    """What training needs from the data section."""

    train: DataLoader  # yields Batch, one bucket each, in train_sampler's order
    train_sampler: BucketSampler  # set_epoch / set_start / state_dict for the trainer
    val: DataLoader | None  # yields Batch in a fixed order; None when there is no validation data
    report: DataReport  # samples left out (bad + filtered); print report.summary() at the end
    num_train_samples: int
    num_val_samples: int


def _loader_kwargs(num_workers: int, seed: int, pad_multiple: int = 1) -> dict:
    return dict(
        batch_size=1,
        collate_fn=functools.partial(collate_bucket, pad_multiple=pad_multiple) if pad_multiple > 1 else collate_bucket,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # The DataLoader draws a base seed for its workers on every iter(); from a private generator it leaves the
        # global torch RNG alone, so a resumed run's dropout etc. match a straight run.
        generator=seeded_generator(seed, TAG_LOADER),
    )


def seeded_subset(n: int, k: int, *seed_parts: int) -> list[int]:
    """``k`` of ``range(n)`` chosen by a seeded permutation, returned in ascending order."""
    if k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=seeded_generator(*seed_parts))[:k].tolist())


def chain_transforms(built_in: list, entries: list | None, key: str) -> Transform | None:
    """The built-in transforms, then those a recipe names (data.augment / data.transforms: a registered name or
    {type: name, arg: value}); None when there are none."""
    chain = [t for t in built_in if t is not None]
    for i, node in enumerate(entries or []):
        node = {"type": node} if isinstance(node, str) else dict(node)
        cls = TRANSFORMS.get(node.pop("type", None), f"data.{key}[{i}].type")
        try:
            chain.append(cls(**node))
        except (TypeError, ValueError) as e:
            raise RecipeError(f"data.{key}[{i}]: {e}") from None
    return None if not chain else chain[0] if len(chain) == 1 else Compose(chain)


def build_dataloaders(cfg: DataConfig, vocab: Vocabulary, seed: int, rank: int = 0,
                      world_size: int = 1) -> DataBundle:
    """Training and validation loaders from the recipe's ``data:`` section.

    Validation is ``cfg.val_split`` when set (the papers' protocol: a test year), otherwise a seeded hold-out of
    ``cfg.val_holdout`` training samples (default min(500, 10%)), removed from training. Training buckets drop captions longer than
    ``max_len`` and images larger than ``max_image_pixels`` (counted in the report); validation drops nothing.
    Training buckets are sharded whole across ``world_size`` ranks (every rank gets the same number: the epoch
    order wraps around); validation buckets too, without repeats (rank r takes buckets r, r+W, ...; the trainer sums
    the ranks' counts).
    """
    report = DataReport()  # cfg's values were range-checked when it was built (DataConfig.problems)
    root = resolve_data_root(cfg.root)  # no data.root: $HMERZOO_DATA, the checkout's data/crohme, the user cache
    dataset_cls = dataset_class(root, cfg.format, cfg.dataset)
    train_full = dataset_cls(root, cfg.train_split, vocab, skip_bad=cfg.skip_bad, report=report)

    # validation samples
    val_set: CrohmeDataset | None = None
    train_indices = list(range(len(train_full)))
    if cfg.val_split is None:
        holdout = holdout_size(cfg.val_holdout, len(train_full))
        if holdout > 0:
            if holdout >= len(train_full):
                raise DataError(f"data.val_holdout={holdout} leaves no training samples: split "
                                f"'{cfg.train_split}' has {len(train_full)}; lower data.val_holdout or set "
                                "data.val_split to a test split")
            held = set(seeded_subset(len(train_full), holdout, seed, TAG_HOLDOUT))
            val_set = train_full.select(sorted(held))
            train_indices = [i for i in train_indices if i not in held]
    else:
        val_set = dataset_cls(root, cfg.val_split, vocab, skip_bad=cfg.skip_bad, report=report)
    if val_set is not None and cfg.val_limit is not None:
        val_set = val_set.select(seeded_subset(len(val_set), cfg.val_limit, seed, TAG_VAL_LIMIT))

    train_set = train_full.select(train_indices)
    if cfg.train_limit is not None:
        train_set = train_set.select(seeded_subset(len(train_set), cfg.train_limit, seed, TAG_TRAIN_LIMIT))

    # buckets and transforms
    train_buckets = make_buckets(train_set.sizes, train_set.names, batch_size=cfg.batch_size,
                                 max_pixels=cfg.max_pixels, caption_lengths=train_set.caption_lengths,
                                 max_len=cfg.max_len, max_image_pixels=cfg.max_image_pixels, report=report,
                                 split=cfg.train_split, wheres=[r.where for r in train_set.samples])
    if not train_buckets:
        raise DataError(f"{train_set.caption_where}: no training samples left after data.max_len={cfg.max_len} "
                        f"and data.max_image_pixels={cfg.max_image_pixels}; raise these limits\n{report.summary()}")
    limit = chain_transforms([ScaleToLimitRange() if cfg.scale_to_limit else None], cfg.transforms, "transforms")
    augment = chain_transforms([ScaleAugmentation() if cfg.scale_aug else None], cfg.augment, "augment")

    train_data = BucketDataset(train_set, train_buckets, transform=limit, augment=augment, seed=seed,
                               skip_bad=cfg.skip_bad)
    sampler = BucketSampler(len(train_buckets), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    train_loader = DataLoader(train_data, sampler=EpochTaggedSampler(sampler),
                              **_loader_kwargs(cfg.num_workers, seed, cfg.pad_multiple))

    val_loader, num_val = None, 0
    if val_set is not None and len(val_set) > 0:
        val_buckets = make_buckets(val_set.sizes, val_set.names, batch_size=cfg.batch_size,
                                   max_pixels=cfg.max_pixels)
        val_data = BucketDataset(val_set, val_buckets, transform=limit, seed=seed, skip_bad=cfg.skip_bad)
        # Several ranks: each validates its own buckets (a range is a sampler); one rank: all, in order.
        val_sampler = range(rank, len(val_buckets), world_size) if world_size > 1 else None
        val_loader = DataLoader(val_data, sampler=val_sampler, shuffle=False,
                                **_loader_kwargs(cfg.num_workers, seed, cfg.pad_multiple))
        num_val = val_data.num_samples

    return DataBundle(train=train_loader, train_sampler=sampler, val=val_loader, report=report,
                      num_train_samples=train_data.num_samples, num_val_samples=num_val)


def build_eval_loader(root: str | os.PathLike, split: str, vocab: Vocabulary, batch_size: int = 8,
                      max_pixels: int = 320_000, scale_to_limit: bool = False, num_workers: int = 0,
                      skip_bad: bool = False, limit: int | None = None, seed: int = 0,
                      report: DataReport | None = None, format: str = "auto",
                      dataset: str | None = None) -> DataLoader:
    """A DataLoader of Batch over a whole split, in a fixed order (sorted by image area), nothing dropped.

    ``loader.dataset.num_samples`` is the number of samples, ``loader.dataset.report`` the skipped ones (with
    ``skip_bad``); ``limit`` takes a seeded subset of that many samples (quick checks).
    """
    dataset = dataset_class(root, format, dataset)(root, split, vocab, skip_bad=skip_bad, report=report)
    if limit is not None:
        dataset = dataset.select(seeded_subset(len(dataset), limit, seed, TAG_VAL_LIMIT))
    buckets = make_buckets(dataset.sizes, dataset.names, batch_size=batch_size, max_pixels=max_pixels)
    data = BucketDataset(dataset, buckets, transform=ScaleToLimitRange() if scale_to_limit else None,
                         seed=seed, skip_bad=skip_bad)
    return DataLoader(data, shuffle=False, **_loader_kwargs(num_workers, seed))


def bucket_names(loader: DataLoader) -> Sequence[list[str]]:
    """The sample names of each bucket of a loader built here, in bucket-index order (cheap: no images read)."""
    data: BucketDataset = loader.dataset
    return [[data.dataset.samples[i].name for i in bucket] for bucket in data.buckets]
