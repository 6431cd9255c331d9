"""streaming/gateway/live_panel.py and quotas/routing.py: the admin's live panel over a WebSocket.

The consumer runs in this process through Channels' WebsocketCommunicator, with the session cookie
a browser would send. Its rows come from `streaming.telemetry.live`, this process's registry of running
streams, so the streams here are registered in-process (the relay registers a real one the same
way); a gateway process has its own registry, which only that process can read. The path from a
real stream in a gateway process to a browser is tests/browser/test_admin_dashboard.py.
"""

import asyncio
from contextlib import asynccontextmanager

import pytest
from channels.auth import AuthMiddlewareStack
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import path
from prometheus_client import REGISTRY

from streaming.gateway.live_panel import FORBIDDEN, GROUP, PROCESS_ID, TOO_SLOW, LiveConsumer, Publisher
from streaming.gateway.live_panel import websocket_application
from streaming.telemetry import live
from streaming.streams.buffer import StreamFigures

ORIGIN = (b"origin", b"http://127.0.0.1")


def cookie_headers(user, origin=ORIGIN):
    client = Client()
    client.force_login(user)
    session = client.cookies[settings.SESSION_COOKIE_NAME].value
    return [(b"cookie", f"{settings.SESSION_COOKIE_NAME}={session}".encode()), origin]


@pytest.fixture
def staff(make_user):
    return cookie_headers(make_user(staff=True).user)


@pytest.fixture
def running():
    """A stream registered in this process's live registry, as a completion registers one."""
    figures = StreamFigures(completion_tokens=42, pauses=3)
    live.register("req_live_1", 7, "streamer", "sim-small", figures, lambda: True)
    yield figures
    live.unregister("req_live_1")


def tuned(**attributes):
    """The routing of live_panel.websocket_application with a consumer whose timings a test can wait for."""
    consumer = type("TunedLiveConsumer", (LiveConsumer,), attributes)
    return AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter([path("ws/admin/live/", consumer.as_asgi())])))


@asynccontextmanager
async def socket(headers, application=websocket_application):
    communicator = WebsocketCommunicator(application, "/ws/admin/live/", headers=headers)
    connected, code = await communicator.connect(timeout=5)
    try:
        yield communicator, connected, code
    finally:
        await communicator.disconnect()


async def snapshot(communicator, ack=True):
    message = await communicator.receive_json_from(timeout=5)
    assert message["type"] == "snapshot"
    if ack:
        await communicator.send_json_to({"ack": message["seq"]})
    return message


def staff_member(make_user, *permissions):
    user = make_user().user
    user.is_staff = True
    user.save()
    user.user_permissions.add(*Permission.objects.filter(codename__in=permissions))
    return cookie_headers(user)


@pytest.fixture
def refused(make_user):
    return {"anonymous": [ORIGIN], "member": cookie_headers(make_user().user),
            "staff without view_usage": staff_member(make_user)}


async def test_only_staff_who_may_view_usage_can_open_the_socket(refused):
    for who, headers in refused.items():
        async with socket(headers) as (_, connected, code):
            assert (connected, code) == (False, FORBIDDEN), who


async def test_a_foreign_origin_is_refused(staff):
    async with socket([staff[0], (b"origin", b"http://evil.example")]) as (_, connected, _code):
        assert not connected


async def test_staff_see_running_streams_then_their_progress(staff, running):
    async with socket(staff) as (communicator, connected, _):
        assert connected
        first = await snapshot(communicator)
        assert (first["seq"], first["processes"], first["total"]) == (1, 1, 1)
        (row,) = first["streams"]
        assert {k: row[k] for k in ("request_id", "user_id", "username", "model", "tokens", "paused", "pauses")} == {
            "request_id": "req_live_1", "user_id": 7, "username": "streamer", "model": "sim-small", "tokens": 42,
            "paused": True, "pauses": 3}
    running.completion_tokens = 50
    async with socket(staff, tuned(interval_seconds=0.02)) as (communicator, _, _code):
        assert (await snapshot(communicator))["streams"][0]["tokens"] == 50
        live.active.clear()
        assert (await snapshot(communicator))["streams"] == []


async def test_unacknowledged_snapshots_stop_at_the_window_and_resume_on_ack(staff, running):
    async with socket(staff, tuned(interval_seconds=0.02, window=3)) as (communicator, _, _code):
        seqs = [(await snapshot(communicator, ack=False))["seq"] for _ in range(3)]
        assert seqs == [1, 2, 3]
        assert await communicator.receive_nothing(timeout=0.3)  # 15 ticks: all skipped
        await communicator.send_json_to({"ack": 3})
        assert (await snapshot(communicator))["seq"] == 4


async def test_a_tab_that_stops_acknowledging_is_closed(staff, running):
    dropped = REGISTRY.get_sample_value("sluice_live_panel_dropped_total") or 0
    async with socket(staff, tuned(interval_seconds=0.02, window=2, stall_seconds=0.2)) as (communicator, _, _c):
        for _ in range(2):
            await snapshot(communicator, ack=False)
        closed = await communicator.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": TOO_SLOW}
    assert REGISTRY.get_sample_value("sluice_live_panel_dropped_total") == dropped + 1


async def test_snapshots_of_other_processes_are_merged_until_they_go_quiet(staff, running):
    remote_row = {"request_id": "req_elsewhere", "user_id": 8, "username": "far", "model": "sim-large",
                  "tokens": 900, "tokens_per_second": 30.0, "paused": False, "pauses": 0, "seconds": 30.0}
    async with socket(staff, tuned(interval_seconds=0.02, stale_seconds=0.3)) as (communicator, _, _c):
        await get_channel_layer().group_send(GROUP, {"type": "live.snapshot", "process": "elsewhere:1",
                                                     "streams": [remote_row]})
        message = await snapshot(communicator)
        while message["processes"] == 1:
            message = await snapshot(communicator)
        assert [row["request_id"] for row in message["streams"]] == ["req_elsewhere", "req_live_1"]  # busiest first
        while message["processes"] == 2:  # no news from it for stale_seconds: it drops out
            message = await snapshot(communicator)
        assert [row["request_id"] for row in message["streams"]] == ["req_live_1"]


async def test_the_publisher_shares_this_process_while_it_has_streams(running):
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(GROUP, channel)
    publisher = Publisher()
    publisher.interval_seconds = 0.02
    try:
        publisher.ensure_running()
        message = await asyncio.wait_for(layer.receive(channel), 5)
        assert (message["type"], message["process"]) == ("live.snapshot", PROCESS_ID)
        assert [row["request_id"] for row in message["streams"]] == ["req_live_1"]
        live.active.clear()
        await asyncio.wait_for(publisher.task, 5)  # no streams, no subscribers: it stops
    finally:
        await layer.group_discard(GROUP, channel)


async def test_open_panels_are_counted(staff):
    before = REGISTRY.get_sample_value("sluice_live_panel_clients")
    async with socket(staff) as (communicator, _, _c):
        await snapshot(communicator)
        assert REGISTRY.get_sample_value("sluice_live_panel_clients") == before + 1
    assert REGISTRY.get_sample_value("sluice_live_panel_clients") == before


@pytest.fixture
def viewer(make_user):
    return staff_member(make_user, "view_usage")


async def test_staff_granted_view_usage_may_open_it(viewer):
    async with socket(viewer) as (communicator, connected, _code):
        assert connected and (await snapshot(communicator))["type"] == "snapshot"
