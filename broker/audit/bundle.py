"""Export bundles: one zip holding a range of entries (as JSON lines, CSV or OCSF events), the
signed checkpoints over that range, and every public key version they name (`keys.json`; older
bundles hold one `public-key.pem`), so an auditor can verify it offline with nothing else.
Every format carries each entry exactly, and the verifier derives the format's row again from
the entry: a row edited in any column shows as an edited entry."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..models import parse_time
from .absence import Cadence
from .chain import GENESIS, Break, canonical
from .events import Entry
from .signing import Keyring, PublicKey, any_public_pem, load_public_key
from .verify import Verification, verify

FORMATS = ("jsonl", "csv", "ocsf")
ENTRY_FILES = {"jsonl": "entries.jsonl", "csv": "entries.csv", "ocsf": "entries.ocsf.jsonl"}
KIND = "jit-broker audit bundle"
CSV_COLUMNS = ("seq", "at", "type", "grant_id", "actor_iss", "actor_sub", "actor", "data", "prev",
               "hash")  # fmt: skip


class BundleError(ValueError):
    """A file that is not a readable bundle (as opposed to a bundle whose entries fail)."""


# --- formats -------------------------------------------------------------------------------------


def _neutral(text: str | None) -> str:
    """A spreadsheet must not run a cell as a formula."""
    text = text or ""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def csv_row(entry: dict) -> list[str]:
    actor = entry.get("actor") or {}
    return [
        str(entry["seq"]),
        entry["at"],
        entry["type"],
        entry.get("grant_id") or "",
        _neutral(actor.get("iss")),
        _neutral(actor.get("sub")),
        canonical(entry.get("actor")).decode(),
        canonical(entry.get("data")).decode(),
        entry["prev"],
        entry["hash"],
    ]


def _entry_of_csv(row: list[str]) -> dict:
    values = dict(zip(CSV_COLUMNS, row, strict=True))
    return {
        "seq": int(values["seq"]),
        "at": values["at"],
        "type": values["type"],
        "grant_id": values["grant_id"] or None,
        "actor": json.loads(values["actor"]),
        "data": json.loads(values["data"]),
        "prev": values["prev"],
        "hash": values["hash"],
    }


ASSIGN, REVOKE, OTHER = 1, 2, 99
ACTIVITIES = {ASSIGN: "Assign Privileges", REVOKE: "Revoke Privileges", OTHER: "Other"}
ACTIVITY_OF = {Entry.ISSUE: ASSIGN, Entry.EXTEND: ASSIGN, Entry.BREAK_GLASS: ASSIGN,
               Entry.REVOKE: REVOKE, Entry.VERIFY: REVOKE, Entry.RECONCILE: REVOKE}  # fmt: skip


OCSF_VERSION = "1.3.0"
# How entries become OCSF events. 2: events that validate against the OCSF schema (the host
# profile declared, no null members, a user always named). Bundles that name no mapping were
# written with 1, and still verify with it: an auditor's old bundle must not turn "edited".
OCSF_MAPPING = 2


def _present(values: dict) -> dict:
    """The members that have a value: OCSF types members, and null is no string."""
    return {name: value for name, value in values.items() if value not in (None, "", {})}


class OcsfMapper:
    """Entries as OCSF User Access Management events (class 3005: assign / revoke privileges).
    Who holds the privilege and which entitlement it is come from the grant's `request` entry,
    so the mapper remembers them while it reads the log in order."""

    def __init__(self, mapping: int = OCSF_MAPPING) -> None:
        self.grants: dict[str, dict] = {}
        self.mapping = mapping

    def event(self, entry: dict) -> dict:
        data, grant_id = entry.get("data") or {}, entry.get("grant_id")
        if entry["type"] == Entry.REQUEST and grant_id:
            self.grants[grant_id] = {
                "principal": data.get("principal") or {},
                "entitlement": data.get("entitlement"),
            }
        grant = self.grants.get(grant_id or "", {})
        principal = grant.get("principal") or {}
        activity = ACTIVITY_OF.get(entry["type"], OTHER)
        failed = (
            bool(data.get("error")) or data.get("gone") is False or data.get("allowed") is False
        )
        actor = entry.get("actor") or {}
        event: dict[str, Any] = {
            "category_uid": 3,
            "category_name": "Identity & Access Management",
            "class_uid": 3005,
            "class_name": "User Access Management",
            "activity_id": activity,
            "activity_name": ACTIVITIES[activity],
            "type_uid": 300500 + activity,
            "type_name": f"User Access Management: {ACTIVITIES[activity]}",
            "time": int(datetime.fromisoformat(entry["at"].replace("Z", "+00:00")).timestamp())
            * 1000,
            "severity_id": 4 if failed else 3 if entry["type"] == Entry.BREAK_GLASS else 1,
            "status_id": 2 if failed else 1,
            "status": "Failure" if failed else "Success",
            "message": f"{entry['type']} of grant {grant_id}" if grant_id else entry["type"],
            "metadata": {
                "version": OCSF_VERSION,
                # `actor` belongs to the host profile: an event carrying it must declare it.
                "profiles": ["host"],
                "product": {"name": "jit-broker", "vendor_name": "jit-broker"},
                "log_name": "audit",
                "uid": str(entry["seq"]),
                "sequence": entry["seq"],
            },
            "actor": _present(
                {
                    "user": _present({"uid": actor.get("sub")}),
                    "idp": _present({"name": actor.get("iss")}),
                }
            ),
            # The class requires `user`: whose privileges these are (the requester; for an entry
            # of no grant, the actor).
            "user": _present(
                {
                    "uid": principal.get("sub") or actor.get("sub") or "unknown",
                    "name": principal.get("name") or principal.get("email") or None,
                    "email_addr": principal.get("email") or None,
                }
            ),
            "privileges": [grant["entitlement"]] if grant.get("entitlement") else [],
            "resource": _present({"uid": grant_id, "type": "jit-broker grant"}),
            "raw_data": canonical(entry).decode(),
        }
        if self.mapping == 1:  # as bundles written before mapping 2 hold it
            del event["metadata"]["profiles"]
            event["actor"] = {"user": {"uid": actor.get("sub")}, "idp": {"name": actor.get("iss")}}
            event["user"] = {
                "uid": principal.get("sub"),
                "name": principal.get("name") or principal.get("email") or None,
                "email_addr": principal.get("email") or None,
            }
            event["resource"] = {"uid": grant_id, "type": "jit-broker grant"}
        return event


# --- writing -------------------------------------------------------------------------------------


def write_bundle(
    path: Path,
    fmt: str,
    entries: Iterable[dict],
    checkpoints: list[dict],
    keyring: Keyring,
    about: dict,
) -> dict:
    """Write the bundle; return its manifest (what it holds, for the exporter to report)."""
    if fmt not in FORMATS:
        raise BundleError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    count, first, last = 0, 0, 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        with bundle.open(ENTRY_FILES[fmt], "w") as raw:
            out = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            write_row = _row_writer(fmt, out)
            for entry in entries:
                write_row(entry)
                count, first, last = count + 1, first or entry["seq"], entry["seq"]
            out.flush()
            out.detach()
        bundle.writestr(
            "checkpoints.jsonl", "".join(canonical(c).decode() + "\n" for c in checkpoints)
        )
        bundle.writestr("keys.json", json.dumps(keyring.as_json(), indent=2))
        legacy = [k for k in keyring.keys.values() if isinstance(k, Ed25519PublicKey)]
        if len(keyring.keys) == 1 and legacy:  # what verifiers before keys.json read
            bundle.writestr("public-key.pem", any_public_pem(legacy[0]))
        manifest = {
            "kind": KIND,
            "version": 1,
            "entries_format": fmt,
            "entries_file": ENTRY_FILES[fmt],
            **({"ocsf_mapping": OCSF_MAPPING} if fmt == "ocsf" else {}),
            "count": count,
            "first_seq": first,
            "last_seq": last,
            "checkpoints": len(checkpoints),
            "key_ids": sorted(keyring.keys),
            **about,
        }
        bundle.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _row_writer(fmt: str, out: io.TextIOWrapper) -> Callable[[dict], object]:
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        return lambda entry: writer.writerow(csv_row(entry))
    if fmt == "ocsf":
        mapper = OcsfMapper()
        return lambda entry: out.write(canonical(mapper.event(entry)).decode() + "\n")
    return lambda entry: out.write(canonical(entry).decode() + "\n")


# --- reading and verifying -----------------------------------------------------------------------


def verify_bundle(
    path: Path, pinned: Keyring | PublicKey | list[PublicKey] | None = None
) -> Verification:
    """Check a bundle with no database and no network. With `pinned` (the keys the auditor
    fetched from /api/v1/audit/public-key beforehand), a bundle whose keys were replaced fails.
    Checkpoints missing for the cadence the manifest states are named as in `jit audit verify`;
    the last entries only when the range reached the log's head when it was exported."""
    try:
        bundle = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path} is not a bundle: {exc}") from None
    with bundle:
        manifest = _manifest(bundle)
        keyring = _bundle_keys(bundle, pinned)
        checkpoints = _checkpoints(bundle)
        first_seq = _int(manifest, "first_seq") or 1
        last = _int(manifest, "last_seq")
        entries = _entries(bundle, manifest)
        cadence, now = _cadence(manifest)
        result = verify(
            entries,
            checkpoints,
            keyring,
            first_seq,
            GENESIS if first_seq == 1 else None,
            cadence=cadence,
            now=now,
            tail_open=last == _int(manifest, "log_head_seq"),
        )
        if result.ok and result.last_seq < last:
            gone = Break(
                result.last_seq + 1,
                f"the manifest lists entries up to seq {last} but the bundle ends at seq "
                f"{result.last_seq}: it was cut short",
            )
            return Verification(False, result.checked, gone.seq, gone.problem)
        return result


def _int(manifest: dict, name: str) -> int:
    value = manifest.get(name)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise BundleError(f"manifest.json: {name} is not a whole number")
    return value


def _cadence(manifest: dict) -> tuple[Cadence | None, datetime | None]:
    """The checkpoint cadence and export time the manifest states (bundles from before they did
    have none, and are checked without absence)."""
    every, tolerance = manifest.get("checkpoint_every"), manifest.get("checkpoint_tolerance")
    if every is None:
        return None, None
    try:
        if not isinstance(every, int | float) or not isinstance(tolerance, int | float):
            raise TypeError
        return Cadence(float(every), float(tolerance)), parse_time(str(manifest["exported_at"]))
    except (KeyError, TypeError, ValueError):
        raise BundleError(
            "manifest.json: the checkpoint cadence or export time is unreadable"
        ) from None


def _checkpoints(bundle: zipfile.ZipFile) -> list[dict]:
    found = []
    for number, line in enumerate(_lines(bundle, "checkpoints.jsonl"), start=1):
        if not line:
            continue
        checkpoint = _parsed(number, lambda line=line: json.loads(line))
        if not isinstance(checkpoint.get("size"), int) or not isinstance(
            checkpoint.get("head"), str
        ):
            raise BundleError(f"line {number} of checkpoints.jsonl is not a checkpoint")
        found.append(checkpoint)
    return found


def _manifest(bundle: zipfile.ZipFile) -> dict:
    try:
        manifest = json.loads(bundle.read("manifest.json"))
    except (KeyError, ValueError) as exc:
        raise BundleError(f"the bundle has no readable manifest.json: {exc}") from None
    if manifest.get("kind") != KIND or manifest.get("entries_format") not in FORMATS:
        raise BundleError("manifest.json does not describe a jit-broker audit bundle")
    return manifest


def _bundle_keys(
    bundle: zipfile.ZipFile, pinned: Keyring | PublicKey | list[PublicKey] | None
) -> Keyring:
    names = bundle.namelist()
    try:
        if "keys.json" in names:
            keyring = Keyring.from_json(json.loads(bundle.read("keys.json")))
        else:
            keyring = Keyring.of_file_key(load_public_key(bundle.read("public-key.pem")), True)
    except (KeyError, ValueError) as exc:
        raise BundleError(f"the bundle's keys cannot be read: {exc}") from None
    if pinned is None:
        return keyring
    # The pinned keys decide; the bundle's own keys are what a forger would replace.
    if isinstance(pinned, Keyring):
        pins = list(pinned.keys.values())
    else:
        pins = pinned if isinstance(pinned, list) else [pinned]
    return keyring.pinned_to(pins)


def _lines(bundle: zipfile.ZipFile, name: str) -> Iterator[str]:
    try:
        raw = bundle.open(name)
    except KeyError:
        raise BundleError(f"the bundle has no {name}") from None
    with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        for line in text:
            yield line.rstrip("\n")


def _entries(bundle: zipfile.ZipFile, manifest: dict) -> Iterator[dict]:
    """Each entry as the format carries it; a row whose other columns disagree with the entry it
    carries comes out with a hash that cannot match, so the verifier calls it edited."""
    fmt = manifest["entries_format"]
    lines = _lines(bundle, ENTRY_FILES[fmt])
    if fmt == "csv":
        rows = csv.reader(lines)
        if next(rows, None) != list(CSV_COLUMNS):
            raise BundleError("entries.csv does not start with the expected header")
        for number, row in enumerate(rows, start=2):
            entry = _parsed(number, lambda row=row: _entry_of_csv(row))
            yield entry if csv_row(entry) == row else _spoiled(entry)
        return
    mapper = OcsfMapper(manifest.get("ocsf_mapping", 1))
    for number, line in enumerate(lines, start=1):
        if fmt == "jsonl":
            yield _parsed(number, lambda line=line: json.loads(line))
            continue
        event = _parsed(number, lambda line=line: json.loads(line))
        entry = _parsed(number, lambda event=event: json.loads(event["raw_data"]))
        yield entry if mapper.event(entry) == event else _spoiled(entry)


def _parsed(number: int, parse: Callable[..., object]) -> dict:
    try:
        value = parse()
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"line {number} of the entries cannot be read: {exc}") from None
    if not isinstance(value, dict):
        raise BundleError(f"line {number} of the entries is not an object")
    return value


def _spoiled(entry: dict) -> dict:
    """The entry with a hash that cannot match: its row was edited outside the entry."""
    return dict(entry, hash="edited outside the entry")
