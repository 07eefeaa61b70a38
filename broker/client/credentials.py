"""A grant's credential on the engineer's machine: kept per grant while it is live (so `jit env` and
a later `jit exec` can use a grant activated earlier) in <config>/brokers/<broker>/grants/, mode
0600, removed when the grant is released or found over; turned into the environment a command
runs with; and, for an SSH certificate, the key pair it certifies, written only into a private
directory the caller removes."""

from __future__ import annotations

import shlex
import shutil
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..models import parse_time
from .errors import ClientError
from .state import StateDir

SSH_KEY_NAME = "id_ed25519"  # ssh looks for <key>-cert.pub beside the key by itself


class CredentialCache:
    """The credentials of one broker's grants, one file each."""

    def __init__(self, state: StateDir, folder: str) -> None:
        self.state = state
        self.folder = f"{folder}/grants"

    def _file(self, grant_id: str) -> str:
        return f"{self.folder}/{grant_id}.json"

    def keep(self, grant: dict, credential: dict, ssh_private_key: str = "") -> dict:
        """Keep a grant's credential (and the SSH key it certifies); returns the record kept."""
        record = {
            "id": grant["id"],
            "entitlement": grant["entitlement"],
            "window_end": grant["window"]["end"],
            "credential": credential,
        }
        if ssh_private_key:
            record["ssh_private_key"] = ssh_private_key
        self.state.write(self._file(grant["id"]), record)
        return record

    def get(self, grant_id: str) -> dict | None:
        return self.state.read(self._file(grant_id))

    def forget(self, grant_id: str) -> None:
        self.state.remove(self._file(grant_id))
        shutil.rmtree(self.state.path(f"{self.folder}/{grant_id}-ssh"), ignore_errors=True)

    def live_for(self, entitlement: str, now: datetime) -> list[dict]:
        """Kept credentials of `entitlement` whose window has not ended, latest end first; those
        whose window ended are removed on the way."""
        found = []
        for grant_id in self.state.names(self.folder):
            record = self.get(grant_id)
            if record is None:
                continue
            if parse_time(record["window_end"]) <= now:
                self.forget(grant_id)
            elif record["entitlement"] == entitlement:
                found.append(record)
        return sorted(found, key=lambda r: r["window_end"], reverse=True)

    def ssh_folder(self, grant_id: str) -> Path:
        """Where `jit env` leaves an SSH grant's key and certificate (removed with the grant)."""
        return self.state.path(f"{self.folder}/{grant_id}-ssh")


def ssh_key_pair() -> tuple[str, str]:
    """A fresh Ed25519 key: (the private key in OpenSSH format, the public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public.decode() + " jit"


def write_ssh_files(folder: Path, record: dict) -> tuple[Path, Path]:
    """The key and its certificate in `folder` (made private), named so ssh -i finds both."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    key, cert = folder / SSH_KEY_NAME, folder / f"{SSH_KEY_NAME}-cert.pub"
    for path, text in (
        (key, record["ssh_private_key"]),
        (cert, record["credential"]["certificate"]),
    ):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(text if text.endswith("\n") else text + "\n")
    return key, cert


def environment(record: dict, vault_addr: str, ssh_files: tuple[Path, Path] | None) -> dict:
    """The variables a command gets for this credential."""
    credential = record["credential"]
    kind = credential.get("type")
    env = {"JIT_GRANT_ID": record["id"], "JIT_WINDOW_END": record["window_end"]}
    if kind == "vault_token":
        if not vault_addr:
            raise ClientError("the broker names no Vault address for VAULT_ADDR")
        env.update(VAULT_ADDR=vault_addr, VAULT_TOKEN=credential["token"])
    elif kind == "database":
        env.update(PGUSER=credential["username"], PGPASSWORD=credential["password"])
        for name, key in (("PGHOST", "host"), ("PGPORT", "port"), ("PGDATABASE", "dbname")):
            if credential.get(key):
                env[name] = str(credential[key])
    elif kind == "ssh":
        if ssh_files is None:
            raise ClientError("an SSH grant needs its key files")
        env.update(JIT_SSH_KEY=str(ssh_files[0]), JIT_SSH_CERT=str(ssh_files[1]))
    elif kind == "tool_task":
        env.update(JIT_SUBJECT_TOKEN=credential["subject_token"])
    else:
        raise ClientError(f"jit does not know how to use a credential of type {kind!r}")
    return env


def ssh_hint(ssh_files: tuple[Path, Path]) -> str:
    key, cert = ssh_files
    return f"ssh -i {shlex.quote(str(key))} -o CertificateFile={shlex.quote(str(cert))} USER@HOST"


def export_lines(env: dict) -> str:
    """`export NAME=value` lines a POSIX shell can eval."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items()))
