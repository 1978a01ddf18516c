"""The deployment tools without Flower processes: TLS material, hospital data folders, checkpoints."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.verification import PolicyBuilder, Store

from common.config import load_config
from common.deployed_sites import load_site_from_folder, prepare_hospital_folders
from common.hospital_folders import HOSPITAL_MANIFEST, load_hospital_folder
from common.sites import load_site
from conftest import base_run_config
from server.checkpoint import ServerCheckpoint, check_compatible, load_checkpoint, save_checkpoint
from server.tls import TLSError, create_federation_material, main as tls_main


def test_tls_material_is_a_valid_chain_for_the_given_hosts(tmp_path) -> None:
    files, created = create_federation_material(tmp_path / "tls", hosts=["127.0.0.1", "localhost"], hospitals=2)
    assert sorted(created) == sorted(["ca.crt", "ca.key", "server.crt", "server.key", "hospital-0.key",
                                      "hospital-0.pub", "hospital-1.key", "hospital-1.pub"])
    for private in (files.ca_key, files.server_key, files.hospital_key(0)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).time(dt.datetime.now(dt.timezone.utc))
    verifier.build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(server, [])
    verifier.build_server_verifier(x509.DNSName("localhost")).verify(server, [])
    with pytest.raises(Exception):  # not valid for another name
        verifier.build_server_verifier(x509.DNSName("example.org")).verify(server, [])
    # the SuperNode key pair in the OpenSSH format flower-supernode and `flwr supernode register` read
    private = load_ssh_private_key(files.hospital_key(0).read_bytes(), None)
    public = load_ssh_public_key(files.hospital_pub(0).read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()


def test_tls_command_adds_hospitals_and_never_overwrites(tmp_path, capsys) -> None:
    assert tls_main([str(tmp_path), "--hospitals", "1"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert tls_main([str(tmp_path), "--hospitals", "2"]) == 0
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(after) - set(before) == {"hospital-1.key", "hospital-1.pub"}
    assert all(after[name] == data for name, data in before.items())
    assert "created hospital-1.key, hospital-1.pub" in capsys.readouterr().out
    with pytest.raises(TLSError, match="neither an IP address nor a DNS name"):
        create_federation_material(tmp_path / "other", hosts=["bad host"])
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def folder_cfg(medmnist_dir, tmp_path, **over):
    rc = {**base_run_config(), "data-dir": str(medmnist_dir), "results-dir": str(tmp_path / "results"),
          "num-hospitals": 4, "num-held-out": 1, "num-server-rounds": 3, "inner-steps": 1}
    rc.update(over)
    return load_config(rc)


def test_hospital_folders_hold_exactly_the_simulated_hospitals(medmnist_dir, tmp_path) -> None:
    cfg = folder_cfg(medmnist_dir, tmp_path)
    manifests = prepare_hospital_folders(cfg, tmp_path / "hospitals")
    assert [m.hospital_id for m in manifests] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospitals"]  # no staging folder left
    for m in manifests:
        folder = tmp_path / "hospitals" / f"hospital-{m.hospital_id}"
        assert sorted(p.name for p in folder.iterdir()) == ["breastmnist.npz", HOSPITAL_MANIFEST]
        with np.load(folder / "breastmnist.npz") as npz:  # the official layout
            assert sorted(npz.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test")
                                               for k in ("images", "labels"))
            assert npz["train_images"].dtype == np.uint8 and npz["train_labels"].shape[1:] == (1,)
        simulated = load_site(cfg, m.hospital_id)
        deployed = load_site_from_folder(cfg, folder, hospital_id=m.hospital_id)
        assert torch.equal(simulated.x, deployed.x) and torch.equal(simulated.y, deployed.y)
        assert m.num_records == simulated.num_records
    data, manifest = load_hospital_folder(tmp_path / "hospitals" / "hospital-0", flag="breastmnist", image_size=28)
    assert manifest.source["num_hospitals"] == 4 and len(data) == manifest.num_records
    assert json.loads((tmp_path / "hospitals" / "hospital-0" / HOSPITAL_MANIFEST).read_text())["sha256"] == manifest.sha256


def test_checkpoint_round_trip_and_compatibility(tmp_path) -> None:
    ckpt = ServerCheckpoint(round=2, config={"seed": 0, "resume": False}, theta={"w": torch.arange(4.0)},
                            strategy={"sampler": {"internal": [1, 2]}}, summary={"rounds": [{"round": 1}]},
                            last_eval=None, elapsed_seconds=3.5)
    path = save_checkpoint(tmp_path / "ck", ckpt)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
    back = load_checkpoint(tmp_path / "ck")
    assert back is not None and back.round == 2 and torch.equal(back.theta["w"], torch.arange(4.0))
    assert back.summary == ckpt.summary and back.strategy == ckpt.strategy
    assert load_checkpoint(tmp_path / "nothing-here") is None
    check_compatible({"seed": 0, "resume": False}, {"seed": 0, "resume": True}, path=path)
