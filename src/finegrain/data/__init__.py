"""Data: readers of published layouts, generated datasets, transforms, samplers."""

from .datasets.base import DatasetError, ImageDataset, Sample, read_image
from .registry import build_dataset, list_datasets, register_dataset

__all__ = ["DatasetError", "ImageDataset", "Sample", "build_dataset", "list_datasets",
           "read_image", "register_dataset"]
