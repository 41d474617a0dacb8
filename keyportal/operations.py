"""Long operations (a rebuild, an export): the request that starts one
answers at once (202, the operation), and the work goes on in keyportal's
event loop; the page, the API and the ``lxcgpu`` client follow it by polling
``api/v1/operations/{id}`` (``?wait=S`` holds the answer until it finishes,
its step changes, or S seconds pass).

While one runs, the container it works on is busy: another change to it
(start, stop, a snapshot, a second rebuild) is refused with a sentence
naming what runs.  Operations live in this process's memory for an hour
after they end (the audit log keeps their outcome for good); a keyportal
restart forgets them, and the work of one that was running stops with it
(LXD finishes the step it was on).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

log = logging.getLogger("keyportal")

#: How long a finished operation can still be read.
KEEP_SECONDS = 3600
#: The most finished operations kept per user (the newest).
KEEP_PER_USER = 20
#: The longest ``?wait=`` honoured, in seconds.
MAX_WAIT = 60

Progress = Callable[[str], None]


def _stamp(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(
        t, dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Operation:
    id: str
    user: str
    kind: str                   # "rebuild", "export"
    server: str
    actor: str
    status: str = "running"     # running, done, failed
    step: str = "starting"      # what it is doing now (a short phrase)
    message: str = ""           # when failed: the user's sentence
    code: int = 200             # when failed: the HTTP status the refusal maps to
    result: dict | None = None  # when done: what the synchronous call would have answered
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    finished: float | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def json(self) -> dict:
        return {"id": self.id, "user": self.user, "kind": self.kind, "server": self.server,
                "status": self.status, "step": self.step, "message": self.message or None,
                "code": self.code if self.status == "failed" else None,
                "result": self.result, "created": _stamp(self.created),
                "updated": _stamp(self.updated), "finished": _stamp(self.finished)}

    def say(self, step: str) -> None:
        """The progress callback (also called from worker threads: two
        plain assignments)."""
        self.step, self.updated = step[:200], time.time()


class Operations:
    """The operations of one keyportal process."""

    def __init__(self, refusal: Callable[[BaseException], tuple[str, int] | None]):
        # refusal(e): the user's sentence and status for an error, or None
        # for one that is a bug (logged with its traceback).
        self._refusal = refusal
        self._ops: dict[str, Operation] = {}
        self._tasks: set[asyncio.Task] = set()

    def running(self, user: str, server: str) -> Operation | None:
        return next((op for op in self._ops.values() if op.status == "running"
                     and op.user == user and op.server == server), None)

    def start(self, user: str, kind: str, server: str, actor: str,
              work: Callable[[Progress], Awaitable[dict]],
              busy: Callable[[Operation], Exception]) -> Operation:
        """Start ``work(progress)`` as an operation; ``busy(op)`` is the
        refusal raised when the container already has one running."""
        self._prune()
        other = self.running(user, server)
        if other is not None:
            raise busy(other)
        op = Operation(id=secrets.token_urlsafe(9), user=user, kind=kind, server=server,
                       actor=actor)
        self._ops[op.id] = op
        log.info("operation %s: %s of %s's container on %s started (by %s)", op.id, kind, user,
                 server, actor)
        task = asyncio.get_running_loop().create_task(self._run(op, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return op

    async def _run(self, op: Operation, work) -> None:
        try:
            op.result = await work(op.say)
            op.status, op.step = "done", "done"
        except Exception as e:          # noqa: BLE001 - every failure is the operation's
            sentence = self._refusal(e)
            if sentence is None:
                log.exception("%s of %s's container on %s failed", op.kind, op.user, op.server)
                sentence = ("keyportal failed; the administrators have the details in its "
                            "log", 500)
            op.message, op.code = sentence
            op.status = "failed"
        finally:
            op.finished = op.updated = time.time()
            op.event.set()
        log.info("operation %s: %s of %s's container on %s %s %s", op.id, op.kind, op.user,
                 op.server, op.status, op.message)

    def get(self, op_id: str) -> Operation | None:
        return self._ops.get(op_id)

    def of(self, user: str) -> list[Operation]:
        """The user's operations, newest first."""
        self._prune()
        return sorted((op for op in self._ops.values() if op.user == user),
                      key=lambda op: op.created, reverse=True)

    async def wait(self, op: Operation, seconds: float) -> None:
        """Until ``op`` ends, its step changes, or ``seconds`` (at most
        MAX_WAIT) pass: a poller sees every step as it comes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(seconds, MAX_WAIT)
        step = op.step
        while op.status == "running" and op.step == step:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                # The step may change in a worker thread: looked at 4 times a second.
                await asyncio.wait_for(op.event.wait(), min(left, 0.25))
            except asyncio.TimeoutError:
                pass

    def _prune(self) -> None:
        now = time.time()
        per_user: dict[str, int] = {}
        for op in sorted(self._ops.values(), key=lambda op: op.created, reverse=True):
            if op.finished is None:
                continue
            per_user[op.user] = per_user.get(op.user, 0) + 1
            if now - op.finished > KEEP_SECONDS or per_user[op.user] > KEEP_PER_USER:
                del self._ops[op.id]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
