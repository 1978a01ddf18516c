"""A Flower app bundle (FAB) and the approval records that travel with it, for both sides.

The hospital's `client.approve_app` signs and verifies bundles; the operator's `server.app_hub`
serves them with the approvals received. Both read a bundle and a record the same way, here. This
package may import Flower (lazily, inside the functions), so it is not part of `common/`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APPROVAL_SUFFIX = ".approval.json"
# The fields of a verification record that Flower reads (Flower Hub's `verifications` items).
FLOWER_FIELDS = ("public_key_id", "signature", "signed_at")


class AppApprovalError(ValueError):
    """A key, trust file, FAB or approval is unusable; the message says which and what to do."""


@dataclass(frozen=True)
class FabInfo:
    """What a FAB is: `@publisher/name`, version, SHA-256 and its files."""

    app_id: str
    version: str
    sha256: str
    files: tuple[str, ...]

    @property
    def spec(self) -> str:
        """The app spec `flwr run` takes: `@publisher/name==version`."""
        return f"{self.app_id}=={self.version}"


# -- bundles ---------------------------------------------------------------------------------------
def fab_info(fab: bytes) -> FabInfo:
    """Id, version, hash and file list of FAB bytes; raises if they are not a FAB."""
    import io  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    from flwr.cli.config_utils import get_fab_metadata  # noqa: PLC0415

    try:
        fab_id, version = get_fab_metadata(fab)
        files = tuple(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    except Exception as exc:  # Flower raises several kinds for a broken bundle
        raise AppApprovalError(f"not a Flower app bundle (FAB): {exc}") from exc
    return FabInfo(app_id=f"@{fab_id}", version=version, sha256=hashlib.sha256(fab).hexdigest(), files=files)


def build_fab(app_dir: str | Path) -> bytes:
    """The FAB `flwr build` / `flwr run` make from a source tree (Flower's build is reproducible)."""
    from flwr.cli.build import build_fab_from_disk  # noqa: PLC0415

    return build_fab_from_disk(Path(app_dir).expanduser().resolve())


def fab_filename(fab: bytes) -> str:
    """`<publisher>.<name>.<version>.<hash8>.fab`, the name `flwr build` gives it."""
    from flwr.cli.build import get_fab_filename  # noqa: PLC0415
    from flwr.common.config import get_fab_config  # noqa: PLC0415

    return get_fab_filename(get_fab_config(fab), hashlib.sha256(fab).hexdigest())


# -- approval records ------------------------------------------------------------------------------
def read_approval(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AppApprovalError(f"cannot read approval {path}: {exc}") from exc
    missing = [f for f in (*FLOWER_FIELDS, "fab_sha256") if not isinstance(record, dict) or f not in record]
    if missing:
        raise AppApprovalError(f"{path} is not an approval record (missing {', '.join(missing)})")
    return record


def flower_verifications(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Only the fields Flower reads, in Flower Hub's `verifications` form."""
    return [{f: r[f] for f in FLOWER_FIELDS} for r in records]
