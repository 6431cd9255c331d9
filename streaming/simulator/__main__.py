"""``python -m streaming.simulator --port 8100``: the simulated upstream alone, under Uvicorn."""

from .app import Control, Simulator


def main(argv=None):
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="Run Sluice's simulated OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--tokens-per-second", type=float, default=0.0)
    parser.add_argument("--ttft", type=float, default=0.0)
    parser.add_argument("--default-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    app = Simulator(Control(tokens_per_second=args.tokens_per_second, ttft_seconds=args.ttft,
                            default_tokens=args.default_tokens))
    # asyncio's loop: the upstream's writes must block while the gateway does not read (docs/backpressure.md).
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, loop="asyncio")


if __name__ == "__main__":
    main()
