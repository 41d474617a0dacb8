"""keyportal's long operations: started at once, followed step by step, a
failure kept as the user's sentence, one at a time per container, and
forgotten an hour after they end."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from keyportal import operations
from keyportal.operations import Operations
from keyportal.portal import PortalError, _busy, _sentence


def ops() -> Operations:
    return Operations(_sentence)


async def test_an_operation_runs_reports_its_steps_and_its_result():
    o = ops()
    gate = asyncio.Event()

    async def work(say):
        say("copying your home")
        await gate.wait()
        say("starting container")
        return {"name": "c1"}
    op = o.start("alice", "rebuild", "node1", "alice", work, _busy)
    assert op.status == "running" and op.step == "starting"
    await asyncio.sleep(0)
    assert op.json()["step"] == "copying your home"
    # While it runs, the container is busy (for this user; bob's is not).
    with pytest.raises(PortalError) as e:
        o.start("alice", "export", "node1", "alice", work, _busy)
    assert e.value.status == 409 and "busy: a rebuild" in str(e.value)
    assert "copying your home" in str(e.value)
    assert o.running("bob", "node1") is None and o.running("alice", "node2") is None
    await o.wait(op, 0.05)                      # not yet: the wait ends on time
    assert op.status == "running"
    gate.set()
    await o.wait(op, 5)
    j = op.json()
    assert j["status"] == "done" and j["result"] == {"name": "c1"} and j["finished"]
    assert j["message"] is None and j["code"] is None
    assert o.running("alice", "node1") is None
    assert [x.id for x in o.of("alice")] == [op.id] and o.of("bob") == []


async def test_a_failure_is_the_users_sentence_and_a_bug_is_logged(caplog):
    o = ops()

    async def refused(say):
        raise PortalError("the GPU server did not finish in time; try again", 504)

    async def bug(say):
        raise KeyError("x")
    a = o.start("alice", "export", "node1", "alice", refused, _busy)
    await o.wait(a, 5)
    assert (a.status, a.code, a.message) == ("failed", 504,
                                             "the GPU server did not finish in time; try again")
    with caplog.at_level(logging.ERROR, "keyportal"):
        b = o.start("alice", "export", "node1", "alice", bug, _busy)
        await o.wait(b, 5)
    assert b.status == "failed" and b.code == 500 and "KeyError" not in b.message
    assert "administrators have the details" in b.message
    assert any(r.exc_info for r in caplog.records)
    # The next one may start: a failed operation holds nothing.
    assert o.running("alice", "node1") is None


async def test_ended_operations_are_forgotten_after_an_hour(monkeypatch):
    o = ops()

    async def quick(say):
        return {}
    old = o.start("alice", "export", "node1", "alice", quick, _busy)
    await o.wait(old, 5)
    old.finished = time.time() - operations.KEEP_SECONDS - 1
    new = o.start("alice", "export", "node1", "alice", quick, _busy)
    await o.wait(new, 5)
    assert o.get(old.id) is None and [x.id for x in o.of("alice")] == [new.id]
    many = [o.start("alice", "export", f"n{i}", "alice", quick, _busy)
            for i in range(operations.KEEP_PER_USER + 3)]
    for op in many:
        await o.wait(op, 5)
    assert len(o.of("alice")) == operations.KEEP_PER_USER


async def test_a_wait_answers_at_the_next_step():
    o = ops()
    gate, second = asyncio.Event(), asyncio.Event()

    async def work(say):
        say("first")
        await gate.wait()
        say("second")
        await second.wait()
        return {}
    op = o.start("alice", "export", "node1", "alice", work, _busy)
    await asyncio.sleep(0)
    assert op.step == "first"
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, gate.set)
    t = loop.time()
    await o.wait(op, 30)
    assert op.step == "second" and op.status == "running" and loop.time() - t < 5
    second.set()
    await o.wait(op, 30)
    assert op.status == "done"
