"""The baseline: a bare aiocoap server whose POST /rx answers 2.04 at once.

It shows what aiocoap itself costs per request on this machine, so the
driver's figure can be read as a ratio (OSCORE, decoding, storage and MQTT on
top of the same CoAP stack). Run as its own process:

    python -m bench.baseline_server --port 0 --ready-file /tmp/port
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code


class TrivialPost(resource.Resource):
    async def needs_blockwise_assembly(self, request):
        return False

    async def render_post(self, request):
        return aiocoap.Message(code=Code.CHANGED)


def bound_port(context: aiocoap.Context) -> int:
    for tokens in context.request_interfaces:
        udp = getattr(getattr(tokens, "token_interface", None), "message_interface", None)
        transport = getattr(udp, "transport", None)
        if transport is not None:
            return transport.get_extra_info("socket").getsockname()[1]
    raise RuntimeError("not bound")


def write_ready(path: Path, text: str) -> None:
    """Tell the parent process we listen (the file appears with its content at once)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


async def serve(host: str, port: int, ready_file: Path | None) -> None:
    site = resource.Site()
    site.add_resource(["rx"], TrivialPost())
    context = await aiocoap.Context.create_server_context(site, bind=(host, port), transports=["udp6"])
    if ready_file is not None:
        write_ready(ready_file, str(bound_port(context)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await context.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, help="write the bound port here once listening")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.host, args.port, args.ready_file))


if __name__ == "__main__":
    main()
