"""Bytes of tiny real images and writers for the reader tests (one copy for every test file)."""

import os

import torch
from torchvision.io import encode_jpeg, encode_png

_IMG = torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
JPEG = encode_jpeg(_IMG).numpy().tobytes()
"""An 8 x 8 JPEG."""
JPEG_TALL = encode_jpeg(_IMG[:, :, :4].contiguous()).numpy().tobytes()
"""An 8 x 4 (height x width) JPEG, a person crop's aspect."""
PNG = encode_png(_IMG).numpy().tobytes()


def write_bytes(path, data: bytes = JPEG) -> None:
    """Write ``data`` (default: the 8 x 8 JPEG) to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
