"""A TCP proxy that delays what clients send, run as its own process (so its work never
competes with the suite's threads for one interpreter): the injected latency of a slow Redis.

    python proxy.py LISTEN_PORT UPSTREAM_PORT      # then write "delay SECONDS" lines to stdin

Every chunk a client sends is held `delay` seconds before it goes upstream, in order; answers
come back at once. With delay 0 it is a plain pass-through.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path


class Delay:
    seconds = 0.0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
    try:
        while chunk := await reader.read(65536):
            if delayed and Delay.seconds:
                await asyncio.sleep(Delay.seconds)
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream_port: int
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        writer.close()  # upstream down: the client sees its connection closed
        return
    await asyncio.gather(_pump(reader, up_writer, True), _pump(up_reader, writer, False))


async def _control() -> None:
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command, _, value = line.strip().partition(" ")
        if command == "delay":
            Delay.seconds = float(value)
        print(f"ok {line.strip()}", flush=True)


async def _main(listen_port: int, upstream_port: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: _client(r, w, upstream_port), "127.0.0.1", listen_port
    )
    print("listening", flush=True)
    async with server:
        await _control()  # stdin closed: the parent is gone, so are we


class DelayProxy:
    """The proxy as a child process, in front of Redis on `upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        from harness.procs import free_port

        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), str(self.port), str(upstream_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "listening":
            self.stop()
            raise RuntimeError("the delay proxy did not start")

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def delay(self, seconds: float) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"delay {seconds}\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()  # acknowledged: the new delay is in force

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin:
                    self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2])))
