"""Two tiny demo backends (v1 on 127.0.0.1:9001, v2 on 127.0.0.1:9002) for examples/.

    python examples/demo.py -- kanal run examples/

starts the backends, runs the command after `--`, and stops the backends when the
command ends (Ctrl-C ends both). Without a command, it serves the backends until
interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from aiohttp import web

VERSIONS = {"v1": 9001, "v2": 9002}


def app_for(version: str) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from shop {version} (path {request.path})\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def main(command: list[str]) -> int:
    runners = []
    for version, port in VERSIONS.items():
        runner = web.AppRunner(app_for(version), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        print(f"demo backend {version} on http://127.0.0.1:{port}", flush=True)
    code = 0
    try:
        if command:
            process = await asyncio.create_subprocess_exec(*command)
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(signum, process.send_signal, signum)
            code = await process.wait()
        else:
            await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()
    return code


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(asyncio.run(main(arguments)))
    except KeyboardInterrupt:
        sys.exit(130)
