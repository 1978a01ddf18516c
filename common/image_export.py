"""Records written as PNG files in class folders: the stand-in for a hospital's image export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common import medmnist as D

__all__ = ["export_png_folders"]


def export_png_folders(images: np.ndarray, labels: np.ndarray, info: D.DatasetInfo, out: str | Path, *,
                       prefix: str = "record") -> list[Path]:
    """Write records as PNG files in one subfolder per class, named as `medmnist.INFO` spells the labels.

    What a hospital's image export looks like to `import_images` (which reads it back to the same
    arrays): the deployment walkthrough's stand-in for a PACS export. `out` must not exist yet.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    names = {int(k): v for k, v in info.labels.items()}
    written = []
    for c in sorted(names):
        (out / names[c]).mkdir()
    for i, (img, label) in enumerate(zip(images, labels)):
        path = out / names[int(label)] / f"{prefix}-{i:05d}.png"
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)
        written.append(path)
    return written
