"""A hospital's SuperNode runs only the app bundle (FAB) the hospital approved.

Fast tests drive Flower's own code paths in-process: the SuperNode's loader of the
`--trusted-entities` file and its `_verify_fab` check, and the SuperLink's Flower Hub download
(`_get_remote_fab`) against `server.app_hub`. The deployment test (`tests/test_deployment.py`)
starts a SuperLink and three SuperNodes with `--trusted-entities` and shows that a bundle differing
from the approved one by one byte of `client/app.py` is refused, as is an unsigned `flwr run .`,
while the approved bundle runs to completion.
"""

from __future__ import annotations

import io
import json
import shutil
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from client import approve_app as aa
from server import app_hub
from app_tools.run_config import APP_DIR


@pytest.fixture(scope="module")
def fab() -> bytes:
    return aa.build_fab(APP_DIR)


def tampered_tree(fab: bytes, folder: Path) -> Path:
    """The approved bundle's sources with one byte of client/app.py changed (its final newline -> a space)."""
    zipfile.ZipFile(io.BytesIO(fab)).extractall(folder)
    shutil.rmtree(folder / ".info", ignore_errors=True)
    path = folder / "client" / "app.py"
    data = bytearray(path.read_bytes())
    data[-1:] = b" " if data[-1:] == b"\n" else b"\n"
    path.write_bytes(bytes(data))
    return folder


def tampered_fab(fab: bytes, folder: Path) -> bytes:
    return aa.build_fab(tampered_tree(fab, folder))


@pytest.fixture
def hospital(tmp_path):
    """(private key, trust mapping as Flower loads it, trust file) of one hospital."""
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519

    priv, key_id = aa.create_approval_key(tmp_path / "approval", name="hospital-0")
    trust_file = priv.with_name(aa.TRUSTED_ENTITIES)
    trusted = _try_obtain_trusted_entities(trust_file)   # exactly what flower-supernode does at start
    _validate_public_keys_ed25519(trusted)
    assert list(trusted) == [key_id] and key_id.startswith("fpk_")
    return aa.load_private_key(priv), trusted, trust_file


def test_keygen_writes_a_private_key_only_the_owner_reads_and_never_replaces_it(tmp_path) -> None:
    priv, key_id = aa.create_approval_key(tmp_path / "k", name="hospital-3")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    pub = priv.with_name(aa.PUBLIC_KEY).read_text()
    assert pub.startswith("ssh-ed25519 ") and pub.strip().endswith("hospital-3-app-approval")
    assert aa.public_key_id(aa.load_public_key(pub)) == key_id
    with pytest.raises(aa.AppApprovalError, match="never replaced"):
        aa.create_approval_key(tmp_path / "k")


def test_flower_build_is_reproducible_so_a_hospital_can_rebuild_what_it_reviewed(tmp_path) -> None:
    fab = aa.build_fab(APP_DIR)
    assert aa.build_fab(APP_DIR) == fab
    info = aa.fab_info(fab)
    assert info.spec.startswith("@fedmeta-med/fedmeta-med==") and "client/app.py" in info.files
    path = tmp_path / aa.fab_filename(fab)
    path.write_bytes(fab)
    assert aa.main(["inspect", str(path), "--source", str(APP_DIR)]) == 0
    assert aa.main(["inspect", str(path), "--source", str(tampered_tree(fab, tmp_path / "t"))]) == 3


def test_supernode_check_accepts_the_approved_bundle_only(fab, hospital, tmp_path) -> None:
    key, trusted, _ = hospital
    approval = aa.sign_fab(fab, key, signer="hospital-0")
    assert aa.supernode_accepts(fab, [approval], trusted)
    # one byte of client/app.py changed: the old approval does not cover the new bundle
    assert not aa.supernode_accepts(tampered_fab(fab, tmp_path / "t"), [approval], trusted)
    # a valid signature by a key the hospital does not list, or no approval at all
    from cryptography.hazmat.primitives.asymmetric import ed25519

    assert not aa.supernode_accepts(fab, [aa.sign_fab(fab, ed25519.Ed25519PrivateKey.generate())], trusted)
    assert not aa.supernode_accepts(fab, [], trusted)
    # a record re-labelled with the trusted key id but signed by another key
    forged = {**aa.sign_fab(fab, ed25519.Ed25519PrivateKey.generate()), "public_key_id": approval["public_key_id"]}
    assert not aa.supernode_accepts(fab, [forged], trusted)
    # a changed timestamp breaks the signature too (it is signed along with the hash)
    assert not aa.supernode_accepts(fab, [{**approval, "signed_at": approval["signed_at"] + 1}], trusted)


def test_command_line_sign_then_verify(fab, hospital, tmp_path, capsys) -> None:
    _, _, trust_file = hospital
    path = tmp_path / "app.fab"
    path.write_bytes(fab)
    assert aa.main(["sign", str(path), "--key", str(trust_file.with_name(aa.PRIVATE_KEY))]) == 0
    (record_path,) = tmp_path.glob(f"*{aa.APPROVAL_SUFFIX}")
    record = json.loads(record_path.read_text())
    assert record["fab_sha256"] == aa.fab_info(fab).sha256 and record["signer"] == "approval"
    assert aa.main(["verify", str(path), str(record_path), "--trusted-entities", str(trust_file)]) == 0
    bad = tmp_path / "bad.fab"
    bad.write_bytes(tampered_fab(fab, tmp_path / "t"))
    assert aa.main(["verify", str(bad), str(record_path), "--trusted-entities", str(trust_file)]) == 3
    assert "REFUSED" in capsys.readouterr().out


def test_trust_adds_a_second_signer_and_refuses_non_ed25519_keys(hospital, tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _, trusted, trust_file = hospital
    board, board_id = aa.create_approval_key(tmp_path / "board", name="review-board")
    assert aa.main(["trust", str(board.with_name(aa.PUBLIC_KEY)), "--trusted-entities", str(trust_file)]) == 0
    assert set(aa.read_trusted_entities(trust_file)) == {*trusted, board_id}
    ecdsa = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(aa.AppApprovalError, match="only Ed25519"):
        aa.add_trusted_key(trust_file, ecdsa)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """`server.app_hub` on 127.0.0.1 and Flower's SuperLink code pointed at it."""
    from flwr.superlink.servicer.control import control_handlers

    folder = tmp_path / "hub"
    folder.mkdir()
    server = app_hub.make_server(app_hub.AppHub(folder), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(control_handlers, "FLWR_SUPERGRID_API_URL", url)  # what the env variable sets
    try:
        yield folder, control_handlers._get_remote_fab
    finally:
        server.shutdown()
        server.server_close()


def test_superlink_downloads_bundle_and_approvals_from_the_hub_and_supernode_check_passes(fab, hospital, hub,
                                                                                          tmp_path) -> None:
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    key, trusted, _ = hospital
    folder, get_remote_fab = hub
    info = aa.fab_info(fab)
    (folder / aa.fab_filename(fab)).write_bytes(fab)
    (folder / f"h0{aa.APPROVAL_SUFFIX}").write_text(json.dumps(aa.sign_fab(fab, key)))
    content, verifications, _ = get_remote_fab(None, info.spec)        # the SuperLink's own download
    assert content == fab and verifications["valid_license"]
    assert _verify_fab(Fab(info.sha256, content, verifications), trusted)  # the SuperNode's own check
    # the server swaps in a bundle with one byte changed and keeps serving the hospital's approval
    (folder / aa.fab_filename(fab)).unlink()
    bad = tampered_fab(fab, tmp_path / "t")
    (folder / aa.fab_filename(bad)).write_bytes(bad)
    record = json.loads((folder / f"h0{aa.APPROVAL_SUFFIX}").read_text())
    (folder / f"h0{aa.APPROVAL_SUFFIX}").write_text(json.dumps({**record, "fab_sha256": aa.fab_info(bad).sha256}))
    content, verifications, _ = get_remote_fab(None, info.spec)
    assert content == bad and len(verifications) == 2
    assert not _verify_fab(Fab(aa.fab_info(bad).sha256, content, verifications), trusted)


def test_hub_refuses_ambiguous_or_unknown_versions(fab, hub, tmp_path) -> None:
    folder, get_remote_fab = hub
    info = aa.fab_info(fab)
    with pytest.raises(Exception, match="Failed to request FAB download link"):
        get_remote_fab(None, info.spec)                      # empty hub: 404
    (folder / "a.fab").write_bytes(fab)
    (folder / "b.fab").write_bytes(tampered_fab(fab, tmp_path / "t"))
    with pytest.raises(app_hub.HubLookupError, match="keep only the approved one"):
        app_hub.AppHub(folder).find(info.app_id, info.version)
    with pytest.raises(app_hub.HubLookupError) as err:
        app_hub.AppHub(folder).find(info.app_id, "9.9.9")
    assert err.value.status == 404 and err.value.detail == {"available_app_versions": [info.version]}
