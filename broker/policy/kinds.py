"""What the policy asks of a credential kind to read an entitlement of it: the KindReader protocol,
which each module in broker/backends implements and the callers hand to the parser (the policy
imports no backend), and the OptionsReader a kind reads its options table with, so that its
problems carry their lines like every other."""

from __future__ import annotations

from typing import Protocol


class OptionsReader(Protocol):
    """The parser, as a kind sees it while reading its options table."""

    @property
    def problem_count(self) -> int:
        """How many problems have been noted so far in the whole file."""
        ...

    def problem(self, path: tuple[str, ...], message: str) -> None:
        """Note a problem at the line of the key `path` (e.g. ("entitlements", NAME, "ssh"))."""
        ...

    def section(
        self, name: str, spec: dict, key: str, keys: tuple[str, ...] | None = None
    ) -> tuple[dict | None, tuple[str, ...]]:
        """The `[entitlements.NAME.<key>]` table (None when absent or not a table, a problem
        noted) and its key path; every key in it but `keys` is noted as unknown."""
        ...

    def names(self, value: object, at: tuple[str, ...], what: str) -> tuple[str, ...]:
        """A list of non-empty names, or () with a problem noted."""
        ...


class KindReader(Protocol):
    """A credential kind as the policy knows it: the `backend` name entitlements use for it, the
    options table it reads (None: it has none), and, for a kind that holds no Vault policies, what
    it lets its holder do instead (None: `vault_policies` must name at least one)."""

    @property
    def name(self) -> str: ...

    @property
    def options_table(self) -> str | None: ...

    @property
    def grants_instead(self) -> str | None: ...

    def read_options(
        self, reader: OptionsReader, name: str, spec: dict, backend: object
    ) -> object | None:
        """Check what is this kind's in the entitlement `name` (its table `spec`, whose backend
        is `backend`, this kind or another), noting every problem with `reader`; the options when
        the entitlement is of this kind and they are sound, else None."""
        ...
