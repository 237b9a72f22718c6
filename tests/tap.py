"""A loopback TCP proxy that records every byte it forwards, to inspect what crosses the cloud hop."""

from __future__ import annotations

import asyncio


class TapProxy:
    """Forwards 127.0.0.1:<port> to an upstream port and keeps a copy of the client->server bytes."""

    def __init__(self, upstream_port: int, delay_s: float = 0.0) -> None:
        """`delay_s` holds back every chunk the upstream sends (a slow or distant cloud)."""
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray, delay_s: float = 0.0
        ) -> None:
            try:
                while data := await src.read(65536):
                    if delay_s:
                        await asyncio.sleep(delay_s)
                    record.extend(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(
            pump(reader, up_writer, self.to_upstream),
            pump(up_reader, writer, self.to_client, self.delay_s),
            return_exceptions=True,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
