"""The `jit` command: one click group holding the operators' commands (admin.py: serve, audit,
policy, vault-policy), which read the server's config, and the engineers' and approvers' commands
(account, grants, execute, approvals), which talk HTTP to a broker through broker/client and never
open its store. Errors of the client become one line and the documented exit code here."""

from __future__ import annotations

import sys

import click

from ..client.errors import ClientError
from ..config import ConfigError, load_settings
from ..errors import StoreUnavailable
from . import account, admin, approvals, execute, grants
from .admin import run_server as run_server

# The subcommands that read the server's config file (and its data directory).
NEEDS_CONFIG = ("serve", "audit")


class JitGroup(click.Group):
    """Turns the client's errors into one readable line and their exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            click.echo(f"jit: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=JitGroup)
@click.option(
    "--config",
    "-c",
    envvar="JIT_CONFIG",
    type=click.Path(dir_okay=False),
    help="The broker's TOML config file, for serve and audit (default: $JIT_CONFIG).",
)
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """jit-broker: just-in-time elevation with verified removal.

    \b
    Engineers:  jit login --broker URL; jit ls; jit request ENT --for 30m --reason ...;
                jit exec ENT -- COMMAND; jit status; jit release ID
    Approvers:  jit approvals; jit approve ID --reason ...; jit deny ID --reason ...
    Operators:  jit -c config.toml serve | audit ...; jit policy check FILE; jit vault-policy

    Exit codes: 0 done, 1 error, 2 usage, 3 denied or forbidden, 4 still pending or timed out,
    5 broker or identity provider unreachable, 6 not logged in.
    """
    ctx.obj = load_settings(config) if ctx.invoked_subcommand in NEEDS_CONFIG else None


for command in (
    admin.serve,
    admin.audit_group,
    admin.policy_group,
    admin.vault_policy,
    *account.COMMANDS,
    *grants.COMMANDS,
    *execute.COMMANDS,
    *approvals.COMMANDS,
):
    main.add_command(command)


def run() -> None:
    """The console script: a broken config is one readable line and exit 2, not a traceback."""
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"jit: {exc}", err=True)
        sys.exit(2)
    except StoreUnavailable as exc:  # the database server out of reach: one line, exit 1
        click.echo(f"jit: {exc.detail}", err=True)
        sys.exit(1)
