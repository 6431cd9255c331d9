"""A provider stream's events are pushed to the relay from the provider connection's own callback while the relay writes
directly (docs/performance.md, "The fourth cut"; issue 20: per-token CPU of paced streams), on real gateway processes
against the simulator over loopback.

The gateway runs with a `sitecustomize` (on its PYTHONPATH) that counts, per request, the times the relay's pump task asked for
the next batch of events (`Relay._next_batch`): once the events are pushed the pump wakes only for what the
callback leaves it (a meter call every block of tokens, the answer's end), not once a token. With
UPSTREAM_STREAMS_OVER_WIRE=0 (aiohttp's client, which cannot push) the pump wakes for every read, as before; the body
the client reads and the ledger row are the same either way.
"""

import pytest

from tests.support.gateways import counted_stream, gateway_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TOKENS = 300

# The relay module needs Django's settings: it is patched as the first response begins (sitecustomize runs before them).
COUNTING = """
import os
from django.core.handlers import asgi

_send_response = asgi.ASGIHandler.send_response


def count_batches():
    from streaming.streams import relay

    next_batch = relay.Relay._next_batch

    async def counted(self):
        with open(os.environ["SLUICE_TEST_BATCH_COUNTS"], "a") as counts:
            counts.write(f"{self.request_id}\\n")
        return await next_batch(self)

    relay.Relay._next_batch = counted


async def send_response(self, response, send):
    if asgi.ASGIHandler.send_response is send_response:  # the first response: before its body's first batch
        asgi.ASGIHandler.send_response = _send_response
        count_batches()
    return await _send_response(self, response, send)


asgi.ASGIHandler.send_response = send_response
"""


@pytest.fixture(scope="module", params=["wire", "aiohttp"])
def counted(request, tmp_path_factory, django_db_setup, django_db_blocker):
    directory = tmp_path_factory.mktemp("counting")
    (directory / "sitecustomize.py").write_text(COUNTING)
    counts = directory / "counts.txt"
    with gateway_server("daphne", PYTHONPATH=str(directory), SLUICE_TEST_BATCH_COUNTS=str(counts),
                        UPSTREAM_STREAMS_OVER_WIRE="1" if request.param == "wire" else "0") as gateway:
        yield request.param, gateway, counts


def pump_batches(counts, request_id):
    return counts.read_text().split().count(request_id)


def test_paced_tokens_are_relayed_in_the_provider_connections_callback(counted, make_user):
    client, gateway, counts = counted
    caller = make_user()
    request_id, events = counted_stream(gateway, caller.key, TOKENS, stream_options={"include_usage": True})
    assert events[-2]["usage"]["completion_tokens"] == TOKENS  # the usage chunk, left to the pump, is relayed
    batches = pump_batches(counts, request_id)
    if client == "wire":
        # Before the direct writes begin, a read per event; then a few meter calls and the answer's end.
        assert batches <= 30, batches
    else:
        assert batches >= TOKENS // 2, batches
