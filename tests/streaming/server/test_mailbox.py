"""streaming/server/backpressure.py `Mailbox`: an HTTP request's application queue (what Daphne's WebRequest puts the
body and the disconnect into, and the application's `receive` reads), in place of Daphne's asyncio.Queue, which held
~3 KB more for the life of every stream (`python -m bench.object_memory`). The end to end cases — a disconnect
reaching the application while it waits for a slow provider, a body read whole — are tests/streaming/streams/
test_disconnect.py and the rest of the suite, on the real server."""

import asyncio

from streaming.server.backpressure import Mailbox


async def test_messages_put_before_a_receive_arrive_in_order():
    mailbox = Mailbox()
    mailbox.put_nowait({"type": "http.request", "body": b"a", "more_body": True})
    mailbox.put_nowait({"type": "http.request", "body": b"b", "more_body": False})
    mailbox.put_nowait({"type": "http.disconnect"})
    assert [(await mailbox.get()).get("body") for _ in range(3)] == [b"a", b"b", None]


async def test_a_waiting_receive_gets_the_next_message():
    mailbox = Mailbox()
    waiting = asyncio.ensure_future(mailbox.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    mailbox.put_nowait({"type": "http.disconnect"})
    assert await asyncio.wait_for(waiting, timeout=1) == {"type": "http.disconnect"}


async def test_a_cancelled_receive_strands_no_message():
    # Two receives wait; the first is cancelled after the put woke it, before it ran: the second gets the message.
    mailbox = Mailbox()
    first, second = asyncio.ensure_future(mailbox.get()), asyncio.ensure_future(mailbox.get())
    await asyncio.sleep(0)
    mailbox.put_nowait({"type": "http.disconnect"})
    first.cancel()
    assert await asyncio.wait_for(second, timeout=1) == {"type": "http.disconnect"}
    assert first.cancelled()
    # And one cancelled while nothing came leaves the mailbox usable.
    third = asyncio.ensure_future(mailbox.get())
    await asyncio.sleep(0)
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    mailbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
    assert (await asyncio.wait_for(mailbox.get(), timeout=1))["type"] == "http.request"
