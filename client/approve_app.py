"""A hospital approves the exact app bundle (FAB) its SuperNode may run, for Flower's own check.

    python -m client.approve_app keygen DIR [--name hospital-0]       # once: signing key + trust file
    python -m client.approve_app inspect FAB [--source APP_DIR] [--unpack DIR]
    python -m client.approve_app sign FAB --key DIR/approval.key [--out FILE]
    python -m client.approve_app verify FAB APPROVAL.json ... --trusted-entities DIR/trusted-entities.yaml
    python -m client.approve_app trust KEY.pub --trusted-entities DIR/trusted-entities.yaml

The SuperNode runs whatever ClientApp the server ships, and that code is what enforces the
hospital's node config (ledger, `max-epsilon`, role). Flower 1.42 lets a SuperNode refuse code
nobody it trusts has signed: `flower-supernode --trusted-entities FILE`, a YAML file mapping public
key ids to Ed25519 public keys (OpenSSH format). For every new run the SuperNode recomputes the
SHA-256 of the FAB it received and runs nothing unless one of the FAB's verification records names
a key in that file and carries a valid Ed25519 signature of `signed_at (8 bytes, big-endian) ||
sha256(FAB)` (`flwr/supernode/start_client_internal.py`, `_verify_fab`); otherwise it answers the
server with "The FAB could not be verified."

This module makes that key, that file and those signatures with Flower's own primitives (the ones
`flwr app review` signs with), so the approval is the hospital's, not Flower Hub's:

- `keygen`: an Ed25519 key pair (`approval.key`, mode 0600, never leaves the hospital;
  `approval.pub`) and `trusted-entities.yaml` listing its public key, for `--trusted-entities`.
- `inspect`: the FAB's id, version, SHA-256 and files; `--source` rebuilds the FAB from a source
  tree with Flower's (reproducible) build and says whether the bytes are identical; `--unpack`
  extracts it for reading, as `flwr app review` does.
- `sign`: after review, an approval record `{public_key_id, signature, signed_at}` (plus the FAB's
  hash, id and version for people) to send to the federation operator, who serves it with the FAB
  (`python -m server.app_hub`). It is bound to those exact bytes: any change to the bundle, one
  byte of one file, needs a new approval.
- `verify`: runs the SuperNode's own check on a FAB and approvals, offline, before anything runs.
- `trust`: adds another signer's public key (for example a federation review board's) to the file.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from app_tools.bundle import (
    APPROVAL_SUFFIX,
    AppApprovalError,
    build_fab,
    fab_filename,
    fab_info,
    flower_verifications,
    read_approval,
)

PRIVATE_KEY, PUBLIC_KEY, TRUSTED_ENTITIES = "approval.key", "approval.pub", "trusted-entities.yaml"
# Flower's documented form of a public key id is `fpk_<UUID>`; ours is derived from the key itself.
_KEY_ID_NAMESPACE = uuid.UUID("0b3d5f2e-6a43-5c1e-9f7a-2d1c8e4b6a90")


# -- keys and the trust file -----------------------------------------------------------------------
def public_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """`fpk_<UUID>` derived from the raw public key, so the same key always has the same id."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"fpk_{uuid.uuid5(_KEY_ID_NAMESPACE, raw.hex())}"


def openssh_public_key(public_key: ed25519.Ed25519PublicKey, comment: str = "") -> str:
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def load_public_key(text: str) -> ed25519.Ed25519PublicKey:
    """An OpenSSH public key line (`ssh-ed25519 AAAA... [comment]`); only Ed25519, as Flower requires."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode("utf-8"))
    except (ValueError, TypeError) as exc:
        raise AppApprovalError(f"not an OpenSSH public key ({exc}): {text.strip()[:60]!r}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise AppApprovalError(f"Flower's --trusted-entities takes only Ed25519 keys, not {type(key).__name__}; "
                               "make one with `ssh-keygen -t ed25519` or `python -m client.approve_app keygen`")
    return key


def load_private_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """An unencrypted OpenSSH Ed25519 private key, read with Flower's own loader."""
    from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key as flwr_load  # noqa: PLC0415

    path = Path(path).expanduser()
    try:
        return flwr_load(path)
    except FileNotFoundError as exc:
        raise AppApprovalError(f"no private key at {path}") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise AppApprovalError(f"{path} is not an unencrypted OpenSSH Ed25519 private key ({exc})") from exc


def read_trusted_entities(path: str | Path) -> dict[str, str]:
    """The `--trusted-entities` file as Flower reads it: a YAML mapping id -> Ed25519 OpenSSH public key."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AppApprovalError(f"no trusted-entities file at {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise AppApprovalError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise AppApprovalError(f"{path} must map public key ids to public keys, e.g. `fpk_<id>: ssh-ed25519 AAAA...`")
    for key_id, key in data.items():
        load_public_key(str(key))
        if not isinstance(key_id, str):
            raise AppApprovalError(f"{path}: key id {key_id!r} must be a string")
    return {str(k): str(v) for k, v in data.items()}


def add_trusted_key(trust_file: str | Path, public_key_line: str) -> str:
    """Add a public key to the trust file (created if missing); return its id. Existing entries stay."""
    trust_file = Path(trust_file).expanduser()
    key = load_public_key(public_key_line)
    key_id = public_key_id(key)
    entities = read_trusted_entities(trust_file) if trust_file.exists() else {}
    if key_id not in entities:
        entities[key_id] = public_key_line.strip()
        trust_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = trust_file.with_name(trust_file.name + ".tmp")
        tmp.write_text(yaml.safe_dump(entities, default_flow_style=False, sort_keys=True, width=1000),
                       encoding="utf-8")
        os.replace(tmp, trust_file)
    return key_id


def create_approval_key(folder: str | Path, *, name: str = "hospital") -> tuple[Path, str]:
    """A new Ed25519 pair in `folder` and a `trusted-entities.yaml` listing it; (private key path, key id).

    Never replaces an existing key: a hospital that loses its key makes a new one and re-approves.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = folder / PRIVATE_KEY, folder / PUBLIC_KEY
    if priv_path.exists() or pub_path.exists():
        raise AppApprovalError(f"{priv_path} or {pub_path} exists already; approval keys are never replaced "
                               "(use another folder for a new key)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    line = openssh_public_key(key.public_key(), f"{name}-app-approval")
    pub_path.write_text(line + "\n", encoding="utf-8")
    key_id = add_trusted_key(folder / TRUSTED_ENTITIES, line)
    return priv_path, key_id


# -- approvals -------------------------------------------------------------------------------------
def sign_fab(fab: bytes, private_key: ed25519.Ed25519PrivateKey, *, signer: str = "",
             signed_at: int | None = None) -> dict[str, Any]:
    """An approval record of these exact FAB bytes, in the form Flower Hub hands to a SuperLink.

    The signature is over `signed_at (8 bytes, big-endian) || sha256(fab)`, made with Flower's
    `create_message_to_sign` and `sign_message`, as `flwr app review` does.
    """
    from flwr.supercore.date import now  # noqa: PLC0415
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, sign_message  # noqa: PLC0415

    info = fab_info(fab)
    ts = int(now().timestamp()) if signed_at is None else int(signed_at)
    signature = sign_message(private_key, create_message_to_sign(hashlib.sha256(fab).digest(), ts))
    return {
        "public_key_id": public_key_id(private_key.public_key()),
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        "signed_at": ts,
        # for people and for the operator's hub; Flower does not read these
        "fab_sha256": info.sha256, "app": info.spec, "signer": signer,
    }


def supernode_accepts(fab: bytes, records: Iterable[Mapping[str, Any]], trusted: Mapping[str, str]) -> bool:
    """Would a `flower-supernode --trusted-entities` with `trusted` run this FAB with these approvals?

    Runs Flower's own code: the SuperLink's conversion of Flower Hub's records
    (`_format_verification`) and the SuperNode's check (`_verify_fab`), both private to flwr 1.42.
    """
    from flwr.supercore.fab import Fab  # noqa: PLC0415
    from flwr.superlink.servicer.control.control_handlers import _format_verification  # noqa: PLC0415
    from flwr.supernode.start_client_internal import _verify_fab  # noqa: PLC0415

    verifications = _format_verification(flower_verifications(records))
    return bool(_verify_fab(Fab(hashlib.sha256(fab).hexdigest(), fab, verifications), dict(trusted)))


# -- command line ----------------------------------------------------------------------------------
def _read_fab(path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise AppApprovalError(f"cannot read the FAB {path}: {exc}") from exc


def _cmd_inspect(args: argparse.Namespace) -> int:
    fab = _read_fab(args.fab)
    info = fab_info(fab)
    print(f"{args.fab}\n  app      {info.spec}\n  sha256   {info.sha256}\n  files    {len(info.files)}")
    for name in info.files:
        print(f"    {name}")
    status = 0
    if args.source:
        rebuilt = build_fab(args.source)
        same = rebuilt == fab
        print(f"  rebuilt from {args.source}: sha256 {hashlib.sha256(rebuilt).hexdigest()} -> "
              + ("IDENTICAL" if same else "DIFFERENT: this bundle is not that source tree"))
        status = 0 if same else 3
    if args.unpack:
        from flwr.cli.install import install_from_fab  # noqa: PLC0415

        where = install_from_fab(fab, Path(args.unpack).expanduser().resolve(), skip_prompt=True)
        print(f"  unpacked for review into {where}")
    return status


def _cmd_sign(args: argparse.Namespace) -> int:
    fab = _read_fab(args.fab)
    key = load_private_key(args.key)
    record = sign_fab(fab, key, signer=args.signer or Path(args.key).expanduser().resolve().parent.name)
    out = Path(args.out) if args.out else Path(args.fab).with_name(
        f"{fab_filename(fab)[:-4]}.{record['public_key_id']}{APPROVAL_SUFFIX}")
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"approved {record['app']} (sha256 {record['fab_sha256']}) as {record['public_key_id']}: {out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    fab = _read_fab(args.fab)
    trusted = read_trusted_entities(args.trusted_entities)
    records = [read_approval(p) for p in args.approvals]
    ok = supernode_accepts(fab, records, trusted)
    info = fab_info(fab)
    print(f"{info.spec} sha256 {info.sha256}: "
          + ("ACCEPTED by a SuperNode with this trust file" if ok else
             "REFUSED: no approval by a trusted key matches these exact bytes"))
    return 0 if ok else 3


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.approve_app", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    kg = sub.add_parser("keygen", help="a new Ed25519 approval key and the trusted-entities.yaml listing it")
    kg.add_argument("folder")
    kg.add_argument("--name", default="hospital", help="a comment on the public key (default 'hospital')")
    ins = sub.add_parser("inspect", help="id, version, SHA-256 and files of a FAB")
    ins.add_argument("fab")
    ins.add_argument("--source", help="rebuild from this app folder and compare (exit 3 if different)")
    ins.add_argument("--unpack", help="extract the bundle into this folder for review")
    sg = sub.add_parser("sign", help="approve these exact FAB bytes with the hospital's key")
    sg.add_argument("fab")
    sg.add_argument("--key", required=True, help="the Ed25519 OpenSSH private key (approval.key)")
    sg.add_argument("--out", help=f"where to write the record (default: beside the FAB, *{APPROVAL_SUFFIX})")
    sg.add_argument("--signer", default="", help="who approved (default: the key's folder name)")
    vf = sub.add_parser("verify", help="would the SuperNode run this FAB with these approvals? (exit 3 if not)")
    vf.add_argument("fab")
    vf.add_argument("approvals", nargs="+")
    vf.add_argument("--trusted-entities", required=True)
    tr = sub.add_parser("trust", help="add another signer's Ed25519 public key to the trust file")
    tr.add_argument("public_key", help="a .pub file (OpenSSH, Ed25519)")
    tr.add_argument("--trusted-entities", required=True)
    args = ap.parse_args(argv)
    try:
        if args.command == "keygen":
            priv, key_id = create_approval_key(args.folder, name=args.name)
            print(f"created {priv} (keep it at the hospital), {priv.with_name(PUBLIC_KEY)} and "
                  f"{priv.with_name(TRUSTED_ENTITIES)} (key id {key_id}); start the SuperNode with "
                  f"--trusted-entities {priv.with_name(TRUSTED_ENTITIES)}")
            return 0
        if args.command == "trust":
            key_id = add_trusted_key(args.trusted_entities, Path(args.public_key).expanduser().read_text())
            print(f"{args.trusted_entities}: trusts {key_id}")
            return 0
        return {"inspect": _cmd_inspect, "sign": _cmd_sign, "verify": _cmd_verify}[args.command](args)
    except (AppApprovalError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
