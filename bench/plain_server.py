"""The ceiling casd is compared to: plain aiohttp with nothing but the transfer.

`python -m bench.plain_server FILE [asyncio|uvloop]` listens on a free 127.0.0.1 port and
prints "serving http://127.0.0.1:PORT". PUT /discard reads the body and drops it; GET /file
answers `web.FileResponse(FILE)`. The loop matters for downloads: on asyncio's own loop
FileResponse uses os.sendfile (zero-copy); uvloop has no loop.sendfile, so there aiohttp
falls back to reading the file and writing the bytes. The benchmark runs both and takes the
faster as the limit.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web


async def discard(request: web.Request) -> web.Response:
    n = 0
    async for data in request.content.iter_any():
        n += len(data)
    return web.json_response({"received": n})


async def serve(path: str) -> None:
    app = web.Application(client_max_size=1 << 30)
    app.router.add_put("/discard", discard)
    app.router.add_get("/file", lambda request: web.FileResponse(path))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"serving http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    loop = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if loop == "uvloop":
        import uvloop

        uvloop.run(serve(sys.argv[1]))
    else:
        asyncio.run(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
