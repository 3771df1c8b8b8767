"""Data: CROHME splits from folders or zips, size buckets, CoMER's transforms, resumable bucket sampling.

Main entry points: :func:`build_dataloaders` (training + validation from a recipe's ``data:`` section),
:func:`build_eval_loader` (one whole split, for evaluation) and :func:`load_image_tensor` (one image for a model).
Importing this package registers the ``crohme``, ``hme100k``, ``folder`` and ``inkml`` datasets (``data.format``) and the
``scale_to_limit`` / ``scale_aug`` transforms.
"""
from .bucketing import REASON_TOO_BIG, REASON_TOO_LONG, make_buckets
from .crohme import CrohmeDataset, Sample, SampleRecord, available_splits, open_split
from .formats import FolderDataset, Hme100kDataset, dataset_class, detect_format
from .inkml_format import InkmlDataset
from .images import load_image_tensor, read_image_bytes, read_image_size
from .loaders import (BucketDataset, DataBundle, bucket_names, build_dataloaders, build_eval_loader,
                      collate_bucket, seeded_subset)
from .report import DataReport
from .sampler import BucketSampler, EpochTaggedSampler, derive_seed, seeded_generator
from .transforms import Compose, ScaleAugmentation, ScaleToLimitRange, resize_like_cv2

__all__ = [
    "BucketDataset", "BucketSampler", "Compose", "CrohmeDataset", "DataBundle", "DataReport", "EpochTaggedSampler",
    "FolderDataset", "Hme100kDataset", "InkmlDataset", "dataset_class", "detect_format",
    "REASON_TOO_BIG", "REASON_TOO_LONG", "Sample", "SampleRecord", "ScaleAugmentation", "ScaleToLimitRange",
    "available_splits", "bucket_names", "build_dataloaders", "build_eval_loader", "collate_bucket", "derive_seed",
    "load_image_tensor", "make_buckets", "open_split", "read_image_bytes", "read_image_size", "resize_like_cv2",
    "seeded_generator", "seeded_subset",
]
