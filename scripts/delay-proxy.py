#!/usr/bin/env python3
"""A TCP forwarder that adds a fixed one-way delay to every byte, in both directions.

Used by scripts/bench-cluster.sh for link latency when the kernel has no netem qdisc:

    delay-proxy.py DELAY_MS LISTEN_PORT:TARGET_PORT [LISTEN_PORT:TARGET_PORT ...]

Every chunk read on one side is written to the other side DELAY_MS after it arrived,
in order, so the added latency does not limit throughput (unlike sleeping between
reads). Listens and connects on 127.0.0.1. Runs until killed.
"""

import asyncio
import sys
import time


async def pump(reader, writer, delay):
    queue = asyncio.Queue()

    async def read():
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                return

    async def write():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        writer.close()


async def serve(listen_port, target_port, delay):
    async def handle(client_reader, client_writer):
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pump(client_reader, target_writer, delay),
            pump(target_reader, client_writer, delay),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


async def main():
    delay = float(sys.argv[1]) / 1000.0
    pairs = [tuple(int(p) for p in arg.split(":")) for arg in sys.argv[2:]]
    await asyncio.gather(*(serve(a, b, delay) for a, b in pairs))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    asyncio.run(main())
