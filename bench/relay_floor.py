"""The floor under the paced-token figure: the CPU a minimal relay spends per event on this machine.

    python -m bench.relay_floor [--connections 50] [--rate 50] [--events 200] [--size 200]

Three processes on loopback, as in the gateway bench's paced level (`bench_gateway.PACED_LEVEL`): an upstream that
writes `--size`-byte events on each connection at `--rate` a second, a relay on uvloop whose protocol writes each
event it receives to its client's connection (one `recv`, one `send`, nothing parsed, nothing counted), and a reader
with the load generator's short time slice (bench/common.py). It prints the relay's CPU (user + system, psutil) per
event. What the gateway spends per paced token above this is its own work: HTTP, parsing, metering, its
frameworks (docs/performance.md, "Paced tokens").
"""

import argparse
import asyncio
import multiprocessing

import psutil
import uvloop

from .common import shorten_time_slice


def _upstream(ports, events, rate, size):
    payload = b"x" * size

    async def main():
        async def serve(reader, writer):
            for _ in range(events):
                writer.write(payload)
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


def _relay(upstream_port, ports):
    async def main():
        loop = asyncio.get_running_loop()
        clients = []

        async def serve(reader, writer):
            clients.append(writer)  # kept: a collected StreamWriter closes its transport
            await loop.create_connection(lambda: _Forward(writer.transport), "127.0.0.1", upstream_port)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    uvloop.run(main())


def _reader(port, connections, received):
    shorten_time_slice()

    async def main():
        async def one():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            total = 0
            while data := await reader.read(65536):
                total += len(data)
            writer.close()
            return total

        received.put(sum(await asyncio.gather(*(one() for _ in range(connections)))))

    uvloop.run(main())


def measure(connections=50, rate=50, events=200, size=200) -> dict:
    ports = multiprocessing.Queue()
    upstream = multiprocessing.Process(target=_upstream, args=(ports, events, rate, size), daemon=True)
    upstream.start()
    relay = multiprocessing.Process(target=_relay, args=(ports.get(timeout=30), ports), daemon=True)
    relay.start()
    relay_port = ports.get(timeout=30)
    try:
        process = psutil.Process(relay.pid)
        before = process.cpu_times()
        received = multiprocessing.Queue()
        reader = multiprocessing.Process(target=_reader, args=(relay_port, connections, received))
        reader.start()
        total = received.get(timeout=events / rate * 3 + 30)
        reader.join()
        after = process.cpu_times()
    finally:
        relay.kill()
        upstream.kill()
    delivered = total / size
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
    args = parser.parse_args(argv)
    print(f"\n## A minimal relay's CPU per event ({args.connections} connections × {args.events} events of "
          f"{args.size} B at {args.rate:g}/s; uvloop, one recv and one send per event)\n")
    print("| run | events | µs per event | user µs | system µs |\n|---:|---:|---:|---:|---:|")
    for run in range(1, args.runs + 1):
        row = measure(args.connections, args.rate, args.events, args.size)
        print(f"| {run} | {row['events']:,.0f} | {row['us_per_event']:.1f} | {row['user_us']:.1f} | "
              f"{row['system_us']:.1f} |")
    print("\nCPU times are counted in 10 ms ticks: at 10,000 events a tick is 1 µs per event.")


if __name__ == "__main__":
    main()
