"""Reading a Vault kind's options table in a policy: the `[entitlements.NAME.<kind>]` table with
the OpenBao role and mount every such kind names, checked, each problem noted at its line through
the policy's OptionsReader. Reads text only; calls no Vault."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ..policy import OptionsReader

VAULT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # one segment of a Vault path
MOUNT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(/[A-Za-z0-9][A-Za-z0-9_-]*)*")


class RoleTable(NamedTuple):
    """A kind's options table as written, with its role and mount (None: a problem noted)."""

    table: dict
    at: tuple[str, ...]
    role: str | None
    mount: str | None


class RoleTableText(NamedTuple):
    """How a kind's table is spoken of in its problems."""

    article: str  # "a" or "an", before the kind's name
    needs: str  # what the missing table must hold, after "needs [entitlements.NAME.<kind>]"
    role_is: str  # what the role names, after "<kind>.role is missing: name"
    mount_like: str  # example mount paths, after "must be a mount path like"


def role_table(
    reader: OptionsReader,
    name: str,
    spec: dict,
    backend: object,
    kind: str,
    keys: tuple[str, ...],
    text: RoleTableText,
) -> RoleTable | None:
    """The `[entitlements.NAME.<kind>]` table (its keys: `keys`), with the role and mount every
    Vault kind's table has (each None when a problem with it was noted); None when the table is
    absent or does not belong (a problem noted when it should be there, or should not)."""
    if backend != kind:
        if kind in spec:
            reader.problem(
                ("entitlements", name, kind),
                f'{name}: {text.article} [{kind}] table needs backend = "{kind}", not {backend!r}',
            )
        return None
    if kind not in spec:
        reader.problem(
            ("entitlements", name),
            f"{name}: {text.article} {kind} entitlement needs [entitlements.{name}.{kind}] "
            f"{text.needs}",
        )
        return None
    table, at = reader.section(name, spec, kind, keys)
    if table is None:
        return None
    role, mount = table.get("role"), table.get("mount", kind)
    if role is None:
        reader.problem(at, f"{name}: {kind}.role is missing: name {text.role_is}")
    elif not isinstance(role, str) or not VAULT_NAME.fullmatch(role):
        reader.problem(
            (*at, "role"),
            f"{name}: {kind}.role {role!r} must be a role name (letters, digits, _ -)",
        )
        role = None
    if not isinstance(mount, str) or not MOUNT.fullmatch(mount):
        reader.problem(
            (*at, "mount"),
            f"{name}: {kind}.mount {mount!r} must be a mount path like {text.mount_like}",
        )
        mount = None
    return RoleTable(table, at, role, mount)
