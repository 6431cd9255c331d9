"""A stream's tokens after the first are written by the relay through the server's body writer (docs/backpressure.md,
"Direct writes"; issue 20: per-token CPU of paced streams), on real gateway processes.

The gateway runs with a `sitecustomize` (on its PYTHONPATH) that counts the `http.response.body` messages Django's
ASGI handler sends for each response and appends the count to a file when the response is done. Before the body
writer every token was one such message (Django's response loop, then the server's `handle_reply`); through Sluice's
server the tokens bypass both, while the body the client reads is unchanged. Uvicorn offers no body writer: the relay
sends every part through Django, as before.
"""

import pytest

from tests.support.gateways import counted_stream, gateway_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TOKENS = 300

COUNTING = """
import os
from django.core.handlers import asgi

_send_response = asgi.ASGIHandler.send_response


async def send_response(self, response, send):
    bodies = 0

    async def counting_send(message):
        nonlocal bodies
        if message["type"] == "http.response.body":
            bodies += 1
        await send(message)

    request_id = response.get('x-request-id', '')  # (Sluice's server lets the headers go once they are sent)
    try:
        await _send_response(self, response, counting_send)
    finally:
        with open(os.environ["SLUICE_TEST_SEND_COUNTS"], "a") as counts:
            counts.write(f"{request_id} {bodies}\\n")


asgi.ASGIHandler.send_response = send_response
"""


@pytest.fixture(scope="module", params=["daphne", "uvicorn"])
def counted(request, tmp_path_factory, django_db_setup, django_db_blocker):
    directory = tmp_path_factory.mktemp("counting")
    (directory / "sitecustomize.py").write_text(COUNTING)
    counts = directory / "counts.txt"
    with gateway_server(request.param, PYTHONPATH=str(directory), SLUICE_TEST_SEND_COUNTS=str(counts)) as gateway:
        yield request.param, gateway, counts


def body_messages(counts, request_id):
    for line in counts.read_text().splitlines():
        rid, count = line.split()
        if rid == request_id:
            return int(count)
    raise AssertionError(f"no count for {request_id}")


def test_paced_tokens_bypass_djangos_response_loop_and_arrive_whole(counted, make_user):
    server, gateway, counts = counted
    caller = make_user()
    request_id, _ = counted_stream(gateway, caller.key, TOKENS)
    messages = body_messages(counts, request_id)
    if server == "daphne":
        # The first token (and the "stream open" comment, if the provider was slow), the end, the empty last message.
        assert messages <= 4, messages
    else:
        assert messages >= TOKENS // 4, messages  # no body writer: every write goes through Django
