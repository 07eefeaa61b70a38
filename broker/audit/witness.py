"""Witnesses: copies of every signed checkpoint kept where the broker's host cannot rewrite them
(an OpenBao KV v2 path the broker may add versions to but never delete or destroy; the SIEM the
forwarder feeds), and the comparison of a local log against them, which names the first
disagreement. Never trusts what a witness answers to be well formed: anything malformed is a
`WitnessError` with words, never a crash."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import hvac
import hvac.exceptions
import requests

from .chain import Break
from .signing import Keyring, is_legacy


class WitnessError(Exception):
    """A witness that cannot be read (or written): unreachable, refused, or malformed."""


class KvWitness:
    """One KV v2 secret whose versions are the checkpoints, one version each, in the order
    signed. The broker's policy lets it create and update `<mount>/data/<path>` (a new version)
    and read it; never delete, undelete, destroy or touch the metadata, so what it wrote stays
    (as long as the secret's max_versions is not reached: README)."""

    def __init__(self, client: hvac.Client, mount: str, path: str) -> None:
        self.client = client
        self.mount = mount
        self.path = path

    @property
    def name(self) -> str:
        return f"openbao:{self.mount}/data/{self.path}"

    def record(self, checkpoint: dict) -> None:
        self._call(
            lambda: self.client.secrets.kv.v2.create_or_update_secret(
                self.path, secret={"checkpoint": checkpoint}, mount_point=self.mount
            )
        )

    def read(self) -> list[dict]:
        """Every version still readable, oldest first (deleted or destroyed ones are skipped:
        the broker's token cannot do that, so someone else did, and the rest still counts)."""
        latest = self._version(None)
        if latest is None:
            return []
        found = []
        for version in range(1, latest[0] + 1):
            read = self._version(version)
            if read is not None and read[1] is not None:
                found.append(read[1])
        return found

    def _version(self, version: int | None) -> tuple[int, dict | None] | None:
        try:
            answer = self.client.secrets.kv.v2.read_secret_version(
                self.path,
                version=version,
                mount_point=self.mount,
                raise_on_deleted_version=False,
            )
        except hvac.exceptions.InvalidPath:
            return None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise WitnessError(f"{self.name} cannot be read: {type(exc).__name__}") from None
        data = answer.get("data") if isinstance(answer, dict) else None
        metadata = (data or {}).get("metadata") or {}
        number = metadata.get("version")
        if not isinstance(number, int):
            raise WitnessError(f"{self.name} answered without a version number")
        value = (data or {}).get("data")
        checkpoint = value.get("checkpoint") if isinstance(value, dict) else None
        return number, checkpoint if isinstance(checkpoint, dict) else None

    def _call(self, call: Callable[[], object]) -> None:
        try:
            call()
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise WitnessError(
                f"{self.name} refused the checkpoint: {type(exc).__name__}"
            ) from None


def kv_witness(client: hvac.Client, where: str) -> KvWitness | None:
    """The `[audit] witness_kv` setting ("<mount>/<path>"), or None when it is empty."""
    if not where:
        return None
    mount, _, path = where.partition("/")
    return KvWitness(client, mount, path)


def read_witness_file(path: Path) -> list[dict]:
    """Checkpoints as a witness kept them: JSON lines, each a checkpoint or a forwarded body
    (`{"entries": [...], "checkpoints": [...]}`), as a SIEM stores what it received."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WitnessError(f"{path} cannot be read: {exc}") from None
    found: list[dict] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise WitnessError(f"line {number} of {path} is not JSON") from None
        items = value.get("checkpoints", []) if isinstance(value, dict) and (
            "checkpoints" in value or "entries" in value
        ) else [value]  # fmt: skip
        if not isinstance(items, list):
            raise WitnessError(f"line {number} of {path}: checkpoints is not a list")
        found.extend(items)
    return found


def well_formed(checkpoints: Iterable[object], source: str) -> list[dict]:
    """Checkpoints with an integer size and a text head; a witness holding anything else is
    named, not crashed on."""
    good = []
    for number, item in enumerate(checkpoints, start=1):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("size"), int)
            or isinstance(item.get("size"), bool)
            or not isinstance(item.get("head"), str)
        ):
            raise WitnessError(f"checkpoint {number} of {source} is not a checkpoint")
        good.append(item)
    return good


def disagreement(
    witnessed: list[dict],
    local: list[dict],
    last_seq: int,
    hash_at: Callable[[int], str | None],
    keyring: Keyring | None,
    source: str,
) -> Break | None:
    """The first (smallest size) way the local log disagrees with what `source` witnessed: a
    log shorter than a witnessed size, another head for the same size, a witnessed checkpoint
    the local log no longer holds; or a witnessed checkpoint that is not the transit key's."""
    held = {(c.get("size"), c.get("signature")) for c in local}
    for checkpoint in sorted(witnessed, key=lambda c: c["size"]):
        size = checkpoint["size"]
        what = (
            f"the checkpoint of size {size} witnessed by {source} (signed {checkpoint.get('at')})"
        )
        # The broker witnesses only what transit signed; a v1 checkpoint in a SIEM's copy is
        # checked where it matters, in the local log.
        if keyring is not None and not is_legacy(checkpoint):
            problem = keyring.problem(checkpoint)
            if problem:
                return Break(size, f"{what} does not hold: {problem}")
        if size > last_seq:
            return Break(
                last_seq + 1,
                f"the log ends at seq {last_seq}, but {what} covers {size} entries: "
                "it was cut short",
            )
        if hash_at(size) != checkpoint["head"]:
            return Break(
                size,
                f"entry {size} is not the one {what} names (another head for the same size): "
                "the log was rewritten up to here",
            )
        if (size, checkpoint.get("signature")) not in held:
            return Break(size, f"{what} is missing from the local log: checkpoints were deleted")
    return None
