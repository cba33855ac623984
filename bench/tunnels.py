#!/usr/bin/env python3
"""Opens N idle CONNECT tunnels through a proxy and holds them until killed.

  tunnels.py PROXY_HOST PROXY_PORT TARGET N READY_FILE

Writes the number of tunnels that got a 200 to READY_FILE once all attempts are done.
"""
import asyncio
import sys


async def open_one(host, port, target, held, sem):
    async with sem:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            if head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"):
                held.append(writer)
            else:
                writer.close()
        except Exception:
            pass


async def main():
    host, port, target, n, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    held = []
    sem = asyncio.Semaphore(200)
    await asyncio.gather(*(open_one(host, port, target, held, sem) for _ in range(n)))
    with open(ready + ".tmp", "w") as f:
        f.write(str(len(held)))
    import os
    os.rename(ready + ".tmp", ready)
    await asyncio.sleep(3600)


asyncio.run(main())
