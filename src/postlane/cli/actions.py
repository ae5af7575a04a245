"""Operator actions on selected deliveries (flush, hold, release, delete; requeue, purge): show
what an action touches, ask first when it destroys, apply it with a progress bar.

:func:`action_command` makes each of them a command; ``queue`` and ``dlq`` add them to their
groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar

import click

from postlane.app import AsyncPostlane
from postlane.cli.context import config_option, with_app
from postlane.cli.output import err, listing, progress_bar, show
from postlane.cli.selectors import build_selector, dead_letter_selector_options, selector_options
from postlane.errors import PostlaneError, SuppressedRecipients
from postlane.queue_actions import QueueAction
from postlane.records import SelectionCount, Selector

F = TypeVar("F", bound=Callable[..., Any])

#: what an action did to a recipient (its outcome, and how far an interrupted one got)
_PAST = {
    QueueAction.FLUSH: "flushed",
    QueueAction.HOLD: "held",
    QueueAction.RELEASE: "released",
    QueueAction.DELETE: "deleted",
    QueueAction.REQUEUE: "requeued",
    QueueAction.PURGE: "purged",
}


def targets(
    ids: Sequence[str], all_: bool, selectors: dict[str, Any], *, required: bool
) -> Selector:
    """The deliveries an action is for: message IDs or ``--all``, narrowed by the selectors."""
    if ids and all_:
        raise click.UsageError("give message IDs or --all, not both")
    if required and not ids and not all_:
        raise click.UsageError("give message IDs, or --all (selectors then narrow it)")
    return build_selector(ids, all_=all_, **selectors)


def _show_selection(action: QueueAction, counts: Sequence[SelectionCount]) -> int:
    total = sum(c.count for c in counts)
    table = listing("lane", "domain", "state", "last class", "recipients", right={"recipients"})
    for c in counts[:30]:
        table.add_row(
            c.lane.value, c.domain, c.state.value, c.cls.value if c.cls else "-", f"{c.count:,}"
        )
    if len(counts) > 30:
        rest = sum(c.count for c in counts[30:])
        table.add_row("...", f"({len(counts) - 30} more groups)", "", "", f"{rest:,}")
    err.print(f"{action.value} will touch {total:,} recipient(s):")
    show(table, console=err)
    return total


def run_action(
    action: QueueAction,
    selector: Selector,
    *,
    confirm: bool,
    yes: bool = False,
    export_path: str | None = None,
    unsuppress: bool = False,
) -> None:
    """Show what an action touches, ask when it destroys, apply it with progress. A requeue
    goes through :meth:`AsyncPostlane.requeue` (refused for suppressed addresses unless
    ``unsuppress``)."""
    in_flight = held = changed = noted = 0

    def being_sent(count: int) -> None:
        nonlocal noted
        noted += count

    async def go(app: AsyncPostlane) -> int | None:
        nonlocal in_flight, held
        if action is QueueAction.DELETE:
            # being sent now: left alone; said, not hidden
            sending = await app.store.summarize(selector, ("sending",))
            in_flight = sum(c.count for c in sending)
        counts = await app.summarize(action, selector)
        total = sum(c.count for c in counts)
        if total and (confirm or err.is_terminal):
            _show_selection(action, counts)
        if total == 0:
            if action is QueueAction.FLUSH:
                # nothing waits there, but a pause or slow-down it names is lifted all the same
                # (a relay's pause, named relay:HOST:PORT, selects no recipient by domain)
                await app.act(action, selector)
                # a held message is not flushed: said, with the way out
                held = sum(c.count for c in await app.store.summarize(selector, ("held",)))
            return None
        question = f"{action.value.capitalize()} {total:,} recipient(s)?"
        lifting: list[str] = []
        if action is QueueAction.REQUEUE and unsuppress and not yes and interactive():
            # lifting suppressions loses what put them there and may hurt the sender's name:
            # an operator at a terminal is shown them and asked, as a purge asks (it went
            # ahead at once, a line per address); a script that says --unsuppress means it
            lifting = await app.suppressed_dead_letters(selector)
        if lifting:
            shown = ", ".join(lifting[:5]) + (
                f" and {len(lifting) - 5:,} more" if len(lifting) > 5 else ""
            )
            err.print(
                f"--unsuppress takes {len(lifting):,} address(es) off the suppression list: "
                f"{shown}",
                markup=False,
            )
            question = (
                f"Requeue {total:,} recipient(s) and lift the suppression of "
                f"{len(lifting):,} address(es)?"
            )
        asks = confirm or bool(lifting)
        if asks and not yes and not _agreed(question):
            raise click.Abort()
        with progress_bar() as bar:
            task = bar.add_task(action.value, total=total)

            def progress(n: int) -> None:
                nonlocal changed
                changed = n
                bar.update(task, completed=n)

            if action is QueueAction.REQUEUE:

                def lifted(address: str) -> None:  # said as it happens: a Ctrl-C keeps it
                    bar.console.print(f"{address}: removed from the suppression list", markup=False)

                requeued = await app.requeue(
                    selector, unsuppress=unsuppress, progress=progress, unsuppressed=lifted
                )
                return requeued.count
            try:
                return await app.act(
                    action, selector, export=export, progress=progress, being_sent=being_sent
                )
            except OSError as exc:  # each slice is written before it is removed: this one stays
                if export is None:
                    raise
                raise PostlaneError(
                    f"cannot write {export_path}: {exc.strerror or exc}; what was not exported "
                    "was not removed"
                ) from None

    export = open_export(export_path) if export_path else None
    try:
        done = with_app(go)
    except KeyboardInterrupt:
        if changed:  # a slice at a time, each whole: said, so that nobody runs it all again
            exported = f" (and written to {export_path} first)" if export_path else ""
            err.print(
                f"postlane: interrupted: {changed - noted:,} recipient(s) had been "
                f"{_PAST[action]}{exported}; the rest of the selection is as it was",
                markup=False,
            )
            _noted_in_flight(action, noted)
        raise
    except SuppressedRecipients as exc:
        raise PostlaneError(_suppressed_refusal(exc.addresses)) from None
    finally:
        if export is not None:
            # each slice was flushed to disk before it was removed: a close that fails (the
            # write that failed, tried again) loses nothing, and that failure was said above
            with contextlib.suppress(OSError):
                export.close()
    if done is None:
        if held:
            click.echo(
                f"nothing to flush: {held:,} recipient(s) of the selection are held (postlane "
                "queue release sends them)",
                err=True,
            )
        else:
            click.echo(f"nothing to {action.value}", err=True)
        _left_in_flight(action, in_flight)
        return
    suffix = f" (exported to {export_path})" if export_path else ""
    click.echo(f"{_PAST[action]} {done - noted:,} recipient(s){suffix}", err=True)
    _left_in_flight(action, in_flight)
    _noted_in_flight(action, noted)


def _noted_in_flight(action: QueueAction, count: int) -> None:
    """What a hold or a release did to deliveries being sent (counted as the action went,
    slice by slice: a count taken before it began was a snapshot of another moment)."""
    if not count:
        return
    if action is QueueAction.HOLD:
        click.echo(
            f"{count:,} more were being sent: each is held once its try is recorded, unless the "
            "try delivers it",
            err=True,
        )
    elif action is QueueAction.RELEASE:
        click.echo(
            f"{count:,} more were being sent with a hold pending: it is cancelled, their tries "
            "decide",
            err=True,
        )


def _agreed(question: str) -> bool:
    """The operator's answer; no answer at all (a script's empty stdin) is said as such, with
    the way on, not a bare "Aborted!"."""
    try:
        return click.confirm(question, default=False, err=True)
    except click.Abort:
        if interactive():
            raise
        click.echo(err=True)  # the question's line ends
        raise PostlaneError(
            "no answer came (stdin is not a terminal): add --yes to go ahead"
        ) from None


def interactive() -> bool:
    """Whether an operator answers at a terminal (not a script's pipe)."""
    return sys.stdin is not None and sys.stdin.isatty()


def _left_in_flight(action: QueueAction, count: int) -> None:
    if not count:
        return
    click.echo(
        f"{count:,} recipient(s) of the selection were being sent and were left alone; "
        f"{action.value} again once their tries are recorded",
        err=True,
    )


def _suppressed_refusal(addresses: Sequence[str]) -> str:
    shown = ", ".join(addresses[:5]) + (
        f" and {len(addresses) - 5} more" if len(addresses) > 5 else ""
    )
    return (
        f"not requeued: {len(addresses)} of these dead letters are on the suppression list "
        f"({shown}), so a worker would mark them suppressed without trying them; add "
        "--unsuppress to lift their suppression and requeue them, or run "
        "'postlane suppress remove ADDR' first (or narrow the selection, e.g. --class)"
    )


def open_export(path: str) -> IO[str]:
    """The ``--export`` file, appended to. It holds whole messages: created readable by its
    owner only (0600), and a file of ours that was readable by others is made so too."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise PostlaneError(f"cannot write {path}: {exc.strerror}") from None
    if stat.S_ISREG(os.fstat(fd).st_mode):  # never a terminal's or a pipe's mode
        with contextlib.suppress(OSError):  # not ours: its owner decides
            os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8")


#: the flag an action alone has, and its help
_ACTION_FLAGS = {
    QueueAction.REQUEUE: (
        "--unsuppress",
        "Lift the suppression of the addresses requeued (else a suppressed address refuses "
        "the requeue: a worker would mark it suppressed without trying it).",
    ),
    QueueAction.FLUSH: (
        "--scheduled",
        "Also send mail scheduled for later (send_at) now; without it a flush leaves "
        "scheduled mail for its time.",
    ),
}


def action_command(
    name: str,
    action: QueueAction,
    help: str,
    *,
    dead_letters: bool = False,
    required: bool = True,
    destructive: bool = False,
) -> click.Command:
    """The command ``name`` applying ``action`` to message IDs or ``--all``, narrowed by the
    selectors (a dead letter's when ``dead_letters``); IDs or ``--all`` must be given when
    ``required`` (``queue flush`` alone may go without). A ``destructive`` action shows what it
    will touch and asks (not with ``--yes``), and can ``--export`` what it removes."""

    def command(
        ids: tuple[str, ...],
        all_: bool,
        export_path: str | None = None,
        yes: bool = False,
        unsuppress: bool = False,
        scheduled: bool = False,
        **selectors: Any,
    ) -> None:
        selector = targets(ids, all_, selectors, required=required)
        if scheduled:
            selector = dataclasses.replace(selector, scheduled=True)
        run_action(
            action,
            selector,
            confirm=destructive,
            yes=yes,
            export_path=export_path,
            unsuppress=unsuppress,
        )

    if action in _ACTION_FLAGS:
        flag, flag_help = _ACTION_FLAGS[action]
        command = click.option(flag, is_flag=True, help=flag_help)(command)
    if destructive or action is QueueAction.REQUEUE:  # a requeue asks before --unsuppress
        command = click.option("--yes", is_flag=True, help="Do not ask.")(command)
    else:  # scripts pass --yes to every action: taken, though this one never asks
        command = click.option("--yes", is_flag=True, help="Taken; this action never asks.")(
            command
        )
    if destructive:
        command = click.option(
            "--export",
            "export_path",
            metavar="FILE",
            help=f"Write what is {_PAST[action]} (JSON Lines).",
        )(command)
    command = (dead_letter_selector_options if dead_letters else selector_options)(command)
    command = click.option("--all", "all_", is_flag=True, help="Every message (selectors narrow).")(
        command
    )
    command = click.argument("ids", nargs=-1, metavar="[ID]...")(command)
    return click.command(name, help=help)(config_option(command))
