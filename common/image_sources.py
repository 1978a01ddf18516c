"""Which files a hospital's image source holds, with their labels and patient ids.

A source is a folder with one subfolder per class (named by the task's label names as
``medmnist.INFO[flag]["label"]`` spells them, or by their indices), a CSV manifest
``path,label[,patient_id]`` (paths relative to the CSV's folder), or, for unlabelled use only, a
flat folder of images. Every bad entry is collected, not skipped (`ImageImportError.report`).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from common import medmnist as D
from common.image_decoding import _Job

__all__ = ["ImageImportError"]

CSV_COLUMNS = ("path", "label", "patient_id")


class ImageImportError(D.DataError):
    """One or more source files are unusable; `report` lists every one as (file, reason)."""

    def __init__(self, src: str | Path, report: list[tuple[str, str]], *, what: str = "bad input file(s)",
                 hint: str = "Fix or remove them, or import the rest with skip_bad=True (--skip-bad).") -> None:
        self.report = sorted(report)
        lines = "\n".join(f"  {f}: {r}" for f, r in self.report)
        super().__init__(f"{len(self.report)} {what} in {src}; nothing was written:\n{lines}\n{hint}")


@dataclass(frozen=True)
class _Source:
    root: Path  # the folder record paths are relative to (absolute, as given)
    layout: str  # "class-folders", "csv" or "flat"
    jobs: tuple[_Job, ...]
    problems: tuple[tuple[str, str], ...]


def _label_lookup(info: D.DatasetInfo) -> dict[str, int]:
    lookup = {str(i): int(i) for i in info.labels}
    lookup.update({name: int(i) for i, name in info.labels.items()})
    return lookup


def _label_help(info: D.DatasetInfo) -> str:
    names = ", ".join(repr(info.labels[str(i)]) for i in range(info.n_classes))
    return f"one of {names} (as medmnist INFO['{info.flag}']['label'] spells them) or an index 0..{info.n_classes - 1}"


def _source_error(src: str | Path, where: str, problem: str) -> ImageImportError:
    return ImageImportError(src, [(where, problem)], what="problem", hint="Fix the source and run the import again.")


def _file_job(root: Path, real_root: Path, path: Path, label: int | None) -> tuple[_Job | None, tuple[str, str] | None]:
    rel = path.relative_to(root).as_posix()
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None, (rel, "broken symlink")
        if not target.is_relative_to(real_root):
            return None, (rel, f"symlink leading out of SRC (to {target}); copy the file into SRC instead")
    return _Job(str(path), rel, label, None), None


def _discover(src: str | Path, info: D.DatasetInfo, require_labels: bool) -> _Source:
    given = Path(src).expanduser()
    absolute = Path(os.path.abspath(given))
    if not given.exists():
        raise _source_error(src, str(src), "does not exist")
    if given.is_file():
        if given.suffix.lower() != ".csv":
            raise _source_error(src, str(src), "is a file but not a .csv manifest (path,label[,patient_id]); "
                                               "SRC must be a folder of class subfolders or such a CSV")
        return _discover_csv(absolute, info, require_labels)
    if not given.is_dir():
        raise _source_error(src, str(src), "is neither a folder nor a .csv file")
    return _discover_tree(absolute, info, require_labels)


def _discover_tree(root: Path, info: D.DatasetInfo, require_labels: bool) -> _Source:
    real_root, lookup = root.resolve(), _label_lookup(info)
    jobs: list[_Job] = []
    problems: list[tuple[str, str]] = []
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    dirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if not e.is_dir()]
    if not dirs:
        if not files:
            raise _source_error(root, ".", "the folder is empty (hidden files are ignored)")
        if require_labels:
            raise _source_error(root, ".", f"no class subfolders: SRC must hold one subfolder per class, named "
                                           f"{_label_help(info)}, or be a CSV manifest path,label[,patient_id]")
        for f in files:
            job, problem = _file_job(root, real_root, Path(f.path), None)
            jobs.extend([job] if job else [])
            problems.extend([problem] if problem else [])
        return _Source(root, "flat", tuple(jobs), tuple(problems))
    problems.extend((f.name, "not inside a class folder (SRC must hold one subfolder per class)") for f in files)
    for d in dirs:
        label = lookup.get(d.name)
        if label is None:
            problems.append((f"{d.name}/", f"unknown class folder {d.name!r}: expected {_label_help(info)}"))
            continue
        if d.is_symlink():
            target = Path(d.path).resolve()
            problems.append((f"{d.name}/", f"symlink leading out of SRC (to {target})" if not target.is_relative_to(
                real_root) else "symlinked folder (not followed: its files would be read twice)"))
            continue
        count = 0
        for dirpath, dirnames, filenames in os.walk(d.path):  # never follows symlinked folders
            for name in sorted(dirnames):
                full = Path(dirpath) / name
                if name.startswith(".") or full.is_symlink():
                    dirnames.remove(name)
                    if not name.startswith("."):
                        target = full.resolve()
                        problems.append((f"{full.relative_to(root).as_posix()}/", (
                            f"symlink leading out of SRC (to {target})" if not target.is_relative_to(real_root)
                            else "symlinked folder (not followed: its files would be read twice)")))
            dirnames.sort()
            for name in sorted(n for n in filenames if not n.startswith(".")):
                count += 1
                job, problem = _file_job(root, real_root, Path(dirpath) / name, label)
                jobs.extend([job] if job else [])
                problems.extend([problem] if problem else [])
        if count == 0:
            problems.append((f"{d.name}/", "class folder has no images"))
    return _Source(root, "class-folders", tuple(jobs), tuple(problems))


def _discover_csv(csv_path: Path, info: D.DatasetInfo, require_labels: bool) -> _Source:
    root, lookup = csv_path.parent, _label_lookup(info)
    real_root = root.resolve()
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _source_error(csv_path, csv_path.name, f"unreadable CSV ({exc})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    p_col, l_col, id_col = CSV_COLUMNS
    allowed = [[p_col, l_col], [p_col, l_col, id_col]] + ([] if require_labels else [[p_col], [p_col, id_col]])
    if header not in allowed:
        raise _source_error(csv_path, csv_path.name, f"header {header} is not one of "
                                                     f"{[','.join(a) for a in allowed]} (a header row is required)")
    col = {name: i for i, name in enumerate(header)}
    jobs: list[_Job] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            where = f"{csv_path.name} line {line}"
            if not any(cell.strip() for cell in row):
                continue
            cell = row[0].strip()
            if len(row) != len(header):
                problems.append((cell or where, f"{where}: {len(row)} values, the header has {len(header)}"))
                continue
            if not cell:
                problems.append((where, "empty path"))
                continue
            lexical = Path(os.path.normpath(root / cell))
            rel = Path(os.path.relpath(lexical, root)).as_posix()
            if rel == ".." or rel.startswith("../"):
                problems.append((cell, f"{where}: path outside the CSV's folder {root}"))
                continue
            try:
                target = lexical.resolve(strict=True)
            except (OSError, RuntimeError):
                problems.append((rel, f"{where}: missing file"))
                continue
            if not target.is_relative_to(real_root):
                problems.append((rel, f"{where}: symlink leading out of the CSV's folder (to {target})"))
                continue
            if target.is_dir():
                problems.append((rel, f"{where}: a folder, not an image file"))
                continue
            if rel in seen:
                problems.append((rel, f"{where}: listed again (first on line {seen[rel]})"))
                continue
            seen[rel] = line
            label = None
            if l_col in col:
                value = row[col[l_col]].strip()
                label = lookup.get(value)
                if label is None:
                    problems.append((rel, f"{where}: unknown label {value!r}: expected {_label_help(info)}"))
                    continue
            patient = None
            if id_col in col:
                patient = row[col[id_col]].strip()
                if not patient:
                    problems.append((rel, f"{where}: empty patient_id (give every row one, or drop the column)"))
                    continue
            jobs.append(_Job(str(lexical), rel, label, patient))
    except csv.Error as exc:
        raise _source_error(csv_path, csv_path.name, f"malformed CSV at line {reader.line_num} ({exc})") from exc
    if not jobs and not problems:
        raise _source_error(csv_path, csv_path.name, "the CSV lists no files")
    return _Source(root, "csv", tuple(jobs), tuple(problems))
