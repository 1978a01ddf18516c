"""A hospital's image source imported into a new hospital folder, with the report of the files left out.

`import_images` writes a folder that `common.hospital_folders.load_hospital_folder` loads; its
`manifest.json` also lists every record with its source file, SHA-256, label and patient id
(`common.hospital_folders.read_patient_ids`). Nothing is written when a file is bad, unless
``skip_bad=True``; then `import_report.json` lists the files left out and why.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common import hospital_folders as HF
from common import medmnist as D
from common.image_conversion import conversion_for
from common.image_sets import _image_set, _read_source

__all__ = ["IMPORT_REPORT", "import_images"]

IMPORT_REPORT = "import_report.json"
SOURCE_KIND = "imported"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Indented JSON, except that each entry of a top-level "records" list takes one line."""
    records = payload.get("records")
    text = json.dumps({k: v for k, v in payload.items() if k != "records"}, indent=2, ensure_ascii=False)
    if records is not None:
        rows = ",\n".join(f"    {json.dumps(r, ensure_ascii=False)}" for r in records)
        text = f'{text[:-2]},\n  "records": [\n{rows}\n  ]\n}}'
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def import_images(src: str | Path, out: str | Path, info: D.DatasetInfo, *, hospital_id: int = 0,
                  skip_bad: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Import a hospital's images into a new hospital folder `out`; return its manifest.

    `out` gets the official-format `.npz` (every record in the train split: imported records have no
    official split, and hospital folders pool the splits anyway) and `manifest.json` with the usual
    fields plus `counts_per_class`, `conversion` and `records` (npz order: file, sha256, label,
    patient_id when given). `out` must not exist or be empty and must lie outside the source; it is
    written in a staging folder beside it and renamed into place, so on any error nothing is left.
    With `skip_bad`, `import_report.json` in `out` lists the files left out and why.
    """
    hospital_id = D._check_int("hospital_id", hospital_id, minimum=0)
    target = Path(out).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise D.DataError(f"output folder {target} exists and is not empty; choose a new folder or remove it first")
    src_path = Path(src).expanduser().resolve()
    src_root = src_path if src_path.is_dir() else src_path.parent
    if src_path.exists() and target.is_relative_to(src_root):
        raise D.DataError(f"output folder {target} lies inside the source {src_root}, which is never modified; "
                          "choose an output folder outside it")
    source, good, problems = _read_source(src, info, skip_bad=skip_bad, require_labels=True, workers=workers)
    conv = conversion_for(info)
    images = _image_set(good)
    n = len(images)
    records = [{"file": r.job.file, "sha256": r.sha256, "label": r.job.label,
                **({"patient_id": r.job.patient_id} if r.job.patient_id is not None else {}), **r.meta} for r in good]
    provenance = {"kind": SOURCE_KIND, "path": str(src_path), "layout": source.layout, "imported": n,
                  "skipped": len(problems), "tool": "python -m client.import_images",
                  "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        folder = staging / "hospital"
        manifest = HF.write_hospital_folder(folder, images.to_data(info), np.arange(n, dtype=np.int64),
                                           hospital_id=hospital_id, split_sizes=(n, 0, 0), source=provenance)
        counts = {info.labels[str(c)]: int((images.labels == c).sum()) for c in range(info.n_classes)}
        full = {**manifest.to_json(), "counts_per_class": counts, "conversion": conv.describe(), "records": records}
        if skip_bad:
            full["import_report"] = IMPORT_REPORT
            _write_json(folder / IMPORT_REPORT, {"source": str(src_path), "imported": n, "skipped": [
                {"file": f, "reason": r} for f, r in problems]})
        _write_json(folder / HF.HOSPITAL_MANIFEST, full)
        os.chmod(folder, 0o755)
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return full
