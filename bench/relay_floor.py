"""The floor under the paced-token figure: the CPU a minimal relay spends per event on this machine.

    python -m bench.relay_floor [--connections 50] [--rate 50] [--events 200] [--size 200] [--parse]

Three processes on loopback, as in the gateway bench's paced level (`bench_gateway.PACED_LEVEL`): an upstream that
writes `--size`-byte events on each connection at `--rate` a second, a relay on uvloop whose protocol writes each
event it receives to its client's connection (one `recv`, one `send`, nothing parsed, nothing counted), and a reader
with the load generator's short time slice (bench/common.py). It prints the relay's CPU (user + system, psutil) per
event. What the gateway spends per paced token above this is its own work: HTTP, parsing, metering, its
frameworks (docs/performance.md, "Paced tokens").

`--parse` makes it a relay of chat completion chunks in one callback, as a protocol-level relay would be: the
upstream sends an HTTP/1.1 chunked body of `data: {chat.completion.chunk}` events (one word of content each), and
the relay's `data_received` undoes the chunked framing, splits the events with Sluice's `SSEParser`, classifies
and meters each with Sluice's `classify` (its JSON parse and o200k_base token count), and writes each event to its
client as a chunk of its own: what the gateway's relay does per token, without the frameworks around it.
"""

import argparse
import asyncio
import multiprocessing

import psutil
import uvloop

from .common import shorten_time_slice

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
WORDS = (b"the", b"quick", b"brown", b"fox", b"jumps", b"over", b"a", b"lazy", b"dog", b"again")


def _event(n) -> bytes:
    """One chunk of a chat completion stream, as HTTP/1.1 chunked framing carries it."""
    data = (b'data: {"id":"chatcmpl-floor","object":"chat.completion.chunk","created":1796523813,"model":"floor",'
            b'"choices":[{"index":0,"delta":{"content":" %s"},"finish_reason":null}]}\n\n' % WORDS[n % len(WORDS)])
    return b"%x\r\n%b\r\n" % (len(data), data)


def _upstream(ports, events, rate, size, parse):
    payload = b"x" * size

    async def main():
        async def serve(reader, writer):
            if parse:
                writer.write(HEAD)
            for n in range(events):
                writer.write(_event(n) if parse else payload)
                await asyncio.sleep(1 / rate)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    uvloop.run(main())


class _Forward(asyncio.Protocol):
    """An upstream connection: each piece received goes to the client's transport at once."""

    def __init__(self, client):
        self.client = client

    def data_received(self, data):
        self.client.write(data)

    def connection_lost(self, exc):
        self.client.close()


class _ParseAndForward(asyncio.Protocol):
    """An upstream connection carrying a chunked body of SSE events: each event parsed, classified and metered, then
    written to the client as a chunk of its own, all in `data_received`."""

    def __init__(self, client):
        from streaming.provider.events import SSEParser, classify

        self.client = client
        self.classify = classify
        self.events = SSEParser()
        self.pending = b""
        self.head = False
        self.tokens = 0

    def data_received(self, data):
        data = self.pending + data if self.pending else data
        if not self.head:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.pending = data
                return
            self.head = True
            self.client.write(HEAD)
            data = data[end + 4:]
        position, parts = 0, []
        while True:  # the chunked framing: size line, payload, CRLF
            line_end = data.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(data[position:line_end], 16)
            end = line_end + 2 + size
            if len(data) < end + 2:
                break
            for payload in self.events.feed(data[line_end + 2:end]):
                event = self.classify(payload)
                self.tokens += event.tokens
                parts.append(b"data: " + event.data + b"\n\n")
            position = end + 2
        self.pending = data[position:]
        if parts:
            part = parts[0] if len(parts) == 1 else b"".join(parts)
            self.client.write(b"%x\r\n%b\r\n" % (len(part), part))

    def connection_lost(self, exc):
        self.client.close()


def _relay(upstream_port, ports, parse):
    async def main():
        loop = asyncio.get_running_loop()
        clients = []
        protocol = _ParseAndForward if parse else _Forward
        if parse:  # the tokenizer's tables load on first use (~0.4 s): before the measurement, as a server's start-up does
            from streaming.provider.events import classify

            classify(_event(0).split(b"data: ", 1)[1].split(b"\n", 1)[0])

        async def serve(reader, writer):
            clients.append(writer)  # kept: a collected StreamWriter closes its transport
            await loop.create_connection(lambda: protocol(writer.transport), "127.0.0.1", upstream_port)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    uvloop.run(main())


def _reader(port, connections, received, parse):
    shorten_time_slice()

    async def main():
        async def one():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            total = 0
            while data := await reader.read(65536):
                total += data.count(b'"content":') if parse else len(data)
            writer.close()
            return total

        received.put(sum(await asyncio.gather(*(one() for _ in range(connections)))))

    uvloop.run(main())


def measure(connections=50, rate=50, events=200, size=200, parse=False) -> dict:
    ports = multiprocessing.Queue()
    upstream = multiprocessing.Process(target=_upstream, args=(ports, events, rate, size, parse), daemon=True)
    upstream.start()
    relay = multiprocessing.Process(target=_relay, args=(ports.get(timeout=30), ports, parse), daemon=True)
    relay.start()
    relay_port = ports.get(timeout=30)
    try:
        process = psutil.Process(relay.pid)
        before = process.cpu_times()
        received = multiprocessing.Queue()
        reader = multiprocessing.Process(target=_reader, args=(relay_port, connections, received, parse))
        reader.start()
        total = received.get(timeout=events / rate * 3 + 30)
        reader.join()
        after = process.cpu_times()
    finally:
        relay.kill()
        upstream.kill()
    delivered = total if parse else total / size
    user, system = after.user - before.user, after.system - before.system
    return {"events": delivered, "us_per_event": (user + system) / delivered * 1e6,
            "user_us": user / delivered * 1e6, "system_us": system / delivered * 1e6}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.relay_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parse", action="store_true", help="chunked SSE chat chunks, parsed and metered")
    args = parser.parse_args(argv)
    what = ("chat completion chunks in a chunked body, each parsed, classified and metered with Sluice's SSEParser "
            "and classify, written as a chunk" if args.parse else f"{args.size} B, relayed as received")
    print(f"\n## A minimal relay's CPU per event ({args.connections} connections × {args.events} events at "
          f"{args.rate:g}/s; uvloop, one recv and one send per event; {what})\n")
    print("| run | events | µs per event | user µs | system µs |\n|---:|---:|---:|---:|---:|")
    for run in range(1, args.runs + 1):
        row = measure(args.connections, args.rate, args.events, args.size, args.parse)
        print(f"| {run} | {row['events']:,.0f} | {row['us_per_event']:.1f} | {row['user_us']:.1f} | "
              f"{row['system_us']:.1f} |")
    print("\nCPU times are counted in 10 ms ticks: at 10,000 events a tick is 1 µs per event.")


if __name__ == "__main__":
    main()
