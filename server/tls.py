"""TLS material and SuperNode keys for a deployed federation, made with `cryptography` (a Flower dependency).

    python -m server.tls DIR [--host 127.0.0.1 --host localhost ...] [--hospitals N] [--days D]

creates in DIR (never overwriting a file that is already there, so it can be re-run to add
hospitals):

- `ca.crt`, `ca.key`: a private certificate authority (ECDSA P-256). `ca.crt` is what every
  hospital and the `flwr` CLI use to check the server; `ca.key` stays with the server operator.
- `server.crt`, `server.key`: the SuperLink's certificate, signed by the CA, valid for exactly the
  host names / IP addresses given with `--host` (subject alternative names).
- `hospital-<i>.key`, `hospital-<i>.pub` for i in 0..N-1: one ECDSA P-384 key pair per hospital in
  OpenSSH format, for Flower's SuperNode authentication. The `.pub` is registered with
  `flwr supernode register`; the `.key` never leaves the hospital. (A hospital may instead make
  its own pair with `ssh-keygen -t ecdsa -b 384 -N "" -f hospital-<i>`.)

Private keys are written with mode 0600. Everything is built in a temporary folder inside DIR and
moved into place only when complete, so an interrupted command leaves no half-written file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


class TLSError(ValueError):
    """The TLS material cannot be created as asked; the message says why and what to do."""


@dataclass(frozen=True)
class FederationFiles:
    """Where the files of `create_federation_material` are."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.folder / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def hospital_key(self, hospital_id: int) -> Path:
        return self.folder / f"hospital-{hospital_id}.key"

    def hospital_pub(self, hospital_id: int) -> Path:
        return self.folder / f"hospital-{hospital_id}.pub"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmeta-med federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise TLSError("the server certificate needs at least one --host (the name or IP address the "
                       "hospitals use to reach the server, e.g. --host 127.0.0.1 --host server.example.org)")
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:@"):
                raise TLSError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return names


def make_ca(*, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmeta-med federation CA"))
        .issuer_name(_name("fedmeta-med federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, hosts: Sequence[str],
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's certificate for `hosts`, signed by the CA (TLS server authentication only)."""
    sans = _subject_alt_names(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_supernode_key() -> tuple[bytes, bytes]:
    """(private, public) OpenSSH-encoded ECDSA P-384 key pair, the format `flower-supernode` and
    `flwr supernode register` read."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _write(path: Path, data: bytes, *, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def create_federation_material(folder: str | Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, hospitals: int = 0,
                               days: int = 365) -> tuple[FederationFiles, list[str]]:
    """Create what is missing in `folder`; return the files and the names of those created now.

    An existing CA is reused (its key must be there if a server certificate has to be made);
    existing files are never overwritten.
    """
    if isinstance(hospitals, bool) or not isinstance(hospitals, int) or hospitals < 0:
        raise TLSError(f"--hospitals must be an integer >= 0, got {hospitals!r}")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise TLSError(f"--days must be an integer >= 1, got {days!r}")
    files = FederationFiles(Path(folder).expanduser().resolve())
    sans = _subject_alt_names(list(hosts))  # validate before writing anything
    del sans
    files.folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tls-staging-", dir=files.folder))
    created: list[str] = []
    try:
        if files.ca_cert.exists():
            ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
            ca_key = None
            if files.ca_key.exists():
                loaded = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
                if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                    raise TLSError(f"{files.ca_key} is not the EC key this command writes")
                ca_key = loaded
        else:
            if files.ca_key.exists() or files.server_cert.exists():
                raise TLSError(f"{files.folder} has {CA_KEY} or {SERVER_CERT} but no {CA_CERT}; remove the "
                               "leftovers or restore ca.crt before creating new material")
            ca_key, ca_cert = make_ca(days=days)
            _write(staging / CA_KEY, _pem_key(ca_key), private=True)
            _write(staging / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        if not files.server_cert.exists():
            if ca_key is None:
                raise TLSError(f"{files.server_cert} is missing and {files.ca_key} is not there to sign a new one")
            key, cert = make_server_cert(ca_key, ca_cert, hosts=list(hosts), days=days)
            _write(staging / SERVER_KEY, _pem_key(key), private=True)
            _write(staging / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), private=False)
        for h in range(hospitals):
            if files.hospital_key(h).exists() or files.hospital_pub(h).exists():
                continue
            private, public = make_supernode_key()
            _write(staging / files.hospital_key(h).name, private, private=True)
            _write(staging / files.hospital_pub(h).name, public, private=False)
        # Everything is complete: move it into place (same file system, so each move is atomic).
        for path in sorted(staging.iterdir()):
            os.replace(path, files.folder / path.name)
            created.append(path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files, created


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.tls",
        description="Create a CA, the SuperLink's TLS certificate and one SuperNode key pair per hospital "
                    "(existing files are kept).")
    parser.add_argument("folder", help="where to write the files (created if missing)")
    parser.add_argument("--host", action="append", dest="hosts", metavar="NAME_OR_IP",
                        help="a host name or IP address the hospitals use to reach the SuperLink; repeat for "
                             f"several (default: {' '.join(DEFAULT_HOSTS)})")
    parser.add_argument("--hospitals", type=int, default=0, help="key pairs hospital-0 .. hospital-<N-1> (default 0)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    args = parser.parse_args(argv)
    try:
        files, created = create_federation_material(args.folder, hosts=args.hosts or list(DEFAULT_HOSTS),
                                                    hospitals=args.hospitals, days=args.days)
    except (TLSError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kept = sorted(p.name for p in files.folder.iterdir() if p.is_file() and p.name not in created)
    print(f"{files.folder}: created {', '.join(created) if created else 'nothing'}"
          + (f"; kept {', '.join(kept)}" if kept else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
