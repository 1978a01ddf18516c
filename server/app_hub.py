"""Hand the SuperLink an app bundle (FAB) together with the hospitals' approvals, as Flower Hub does.

    python -m server.app_hub build HUB_DIR [--app .]      # the FAB `flwr build` makes, into HUB_DIR
    python -m server.app_hub status HUB_DIR               # bundles and the approvals received for each
    python -m server.app_hub serve HUB_DIR [--host 127.0.0.1] [--port 9380]

Why this exists: in Flower 1.42 a FAB reaches a SuperNode with signatures attached only when the
SuperLink downloaded it from Flower Hub. `flwr run @publisher/app==x.y.z <connection>` makes the
SuperLink POST `$FLWR_SUPERGRID_API_URL/hub/fetch-fab`, take `fab_url` and `verifications` from the
answer, download the bundle and attach the verifications to it; a FAB submitted with `flwr run .`
carries none, and a SuperNode started with `--trusted-entities` refuses it. `serve` answers that one
request from a folder on the server's machine (an offline, self-hosted federation has no Flower
Hub): start the SuperLink with `FLWR_SUPERGRID_API_URL=http://127.0.0.1:9380` and submit runs as
`flwr run @fedmeta-med/fedmeta-med==0.1.0 <connection>`.

HUB_DIR holds `*.fab` files (from `build`, or copies of the one the hospitals reviewed) and the
approval records hospitals sent back (`*.approval.json`, from `python -m client.approve_app sign`).
A record is served with the bundle whose SHA-256 it names.

Nobody has to trust this server: it only carries signatures. Each hospital's SuperNode recomputes
the bundle's hash and checks the signature against the keys in its own `--trusted-entities` file,
so a bundle that differs from the approved one by one byte is refused whatever this serves.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from app_tools.bundle import (
    APPROVAL_SUFFIX,
    AppApprovalError,
    FabInfo,
    build_fab,
    fab_filename,
    fab_info,
    flower_verifications,
    read_approval,
)

FETCH_FAB = "/hub/fetch-fab"   # Flower's path: flwr/superlink/servicer/control/control_handlers.py
DEFAULT_PORT = 9380


class HubLookupError(LookupError):
    """No bundle, or more than one, answers a request; `status` is the HTTP status to send."""

    def __init__(self, message: str, *, status: int, detail: Any) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Bundle:
    info: FabInfo
    path: Path


class AppHub:
    """The bundles and approval records in one folder, read afresh at every request."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise AppApprovalError(f"no hub folder at {self.folder}")

    def bundles(self) -> list[Bundle]:
        found = []
        for path in sorted(self.folder.glob("*.fab")):
            try:
                found.append(Bundle(fab_info(path.read_bytes()), path))
            except (AppApprovalError, OSError) as exc:
                print(f"app_hub: skipping {path.name}: {exc}", file=sys.stderr, flush=True)
        return found

    def approvals(self, sha256: str) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.folder.glob(f"*{APPROVAL_SUFFIX}")):
            try:
                record = read_approval(path)
            except AppApprovalError as exc:
                print(f"app_hub: skipping {path.name}: {exc}", file=sys.stderr, flush=True)
                continue
            if record["fab_sha256"] == sha256:
                records.append(record)
        return records

    def find(self, app_id: str, version: str | None) -> Bundle:
        """The one bundle of `app_id` at `version` (None: the highest version)."""
        same_app = [b for b in self.bundles() if b.info.app_id == app_id]
        versions = sorted({b.info.version for b in same_app}, key=lambda v: tuple(int(x) for x in v.split(".")))
        if not same_app:
            raise HubLookupError(f"{app_id} is not in {self.folder}", status=404, detail=f"{app_id} not found")
        wanted = version or versions[-1]
        matches = [b for b in same_app if b.info.version == wanted]
        if not matches:
            raise HubLookupError(f"{app_id}=={wanted} is not in {self.folder}", status=404,
                                 detail={"available_app_versions": versions})
        if len({b.info.sha256 for b in matches}) > 1:
            raise HubLookupError(f"{len(matches)} different bundles in {self.folder} claim {app_id}=={wanted} "
                                 f"({', '.join(b.path.name for b in matches)}); keep only the approved one",
                                 status=409, detail="ambiguous app version")
        return matches[0]

    def bundle_by_hash(self, sha256: str) -> Bundle | None:
        return next((b for b in self.bundles() if b.info.sha256 == sha256), None)


def make_server(hub: AppHub, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server answering Flower's `POST /hub/fetch-fab` and the `GET /fab/<sha256>` it points to."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode("utf-8"))

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") != FETCH_FAB:
                self._json(404, {"detail": f"{self.path} is not served here"})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                bundle = hub.find(str(request["app_id"]), request.get("app_version") or None)
            except (ValueError, KeyError) as exc:
                self._json(400, {"detail": f"bad request: {exc}"})
                return
            except HubLookupError as exc:
                print(f"app_hub: {exc}", flush=True)
                self._json(exc.status, {"detail": exc.detail})
                return
            records = hub.approvals(bundle.info.sha256)
            base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
            print(f"app_hub: {bundle.info.spec} sha256 {bundle.info.sha256[:12]} with {len(records)} approval(s) "
                  f"({', '.join(r['public_key_id'] for r in records) or 'none'})", flush=True)
            self._json(200, {"fab_url": f"{base}/fab/{bundle.info.sha256}",
                             "verifications": flower_verifications(records)})

        def do_GET(self) -> None:  # noqa: N802
            bundle = hub.bundle_by_hash(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/fab/") else None
            if bundle is None:
                self._json(404, {"detail": f"{self.path} is not served here"})
                return
            self._send(200, bundle.path.read_bytes(), "application/octet-stream")

        def log_message(self, fmt: str, *args: Any) -> None:  # one line per request, on stdout
            print(f"app_hub: {self.address_string()} {fmt % args}", flush=True)

    return ThreadingHTTPServer((host, port), Handler)


def _stop(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.app_hub", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    bd = sub.add_parser("build", help="build the app's FAB (as `flwr build` does) into HUB_DIR")
    bd.add_argument("hub_dir")
    bd.add_argument("--app", default=".", help="the app folder (default: the current one)")
    st = sub.add_parser("status", help="the bundles in HUB_DIR and the approvals received for each")
    st.add_argument("hub_dir")
    sv = sub.add_parser("serve", help="answer the SuperLink's Flower Hub requests from HUB_DIR")
    sv.add_argument("hub_dir")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: the SuperLink's "
                                                        "machine only)")
    sv.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = ap.parse_args(argv)
    try:
        if args.command == "build":
            fab = build_fab(args.app)
            out = Path(args.hub_dir).expanduser()
            out.mkdir(parents=True, exist_ok=True)
            path = out / fab_filename(fab)
            path.write_bytes(fab)
            info = fab_info(fab)
            print(f"{path}\n  app {info.spec}, sha256 {info.sha256}\nsend it to the hospitals for review and "
                  f"approval; run it with `flwr run {info.spec} <connection>`")
            return 0
        hub = AppHub(args.hub_dir)
        if args.command == "status":
            for b in hub.bundles():
                records = hub.approvals(b.info.sha256)
                print(f"{b.path.name}: {b.info.spec} sha256 {b.info.sha256}, {len(records)} approval(s)")
                for r in records:
                    print(f"    {r['public_key_id']} {r.get('signer', '')} signed_at {r['signed_at']}")
            return 0
        server = make_server(hub, args.host, args.port)
    except (AppApprovalError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    print(f"app_hub: serving {hub.folder} at http://{args.host}:{server.server_address[1]} "
          f"(set FLWR_SUPERGRID_API_URL to this for the SuperLink)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
