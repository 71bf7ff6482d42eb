"""Checks a gateway the way a client does: Telethon (pip install telethon) pins the server's
public key, runs the auth-key handshake over the intermediate transport and sends a ping.

    python examples/ping.py HOST PORT server-rsa-public.pem
"""

import asyncio
import logging
import sys

from telethon.crypto import rsa
from telethon.network import ConnectionTcpIntermediate, MTProtoSender
from telethon.tl.functions import PingRequest


class Loggers(dict):
    """Telethon asks for a logger per module name."""

    def __missing__(self, key):
        return logging.getLogger(key)


async def main(host: str, port: int, public_key_path: str) -> None:
    with open(public_key_path) as f:
        rsa.add_key(f.read(), old=False)
    loggers = Loggers()
    sender = MTProtoSender(None, loggers=loggers, retries=3, auto_reconnect=False)
    connection = ConnectionTcpIntermediate(host, port, 2, loggers=loggers)
    await asyncio.wait_for(sender.connect(connection), 60)
    print(f"auth key made: id {sender.auth_key.key_id:#018x}")
    pong = await asyncio.wait_for(sender.send(PingRequest(ping_id=42)), 30)
    print(f"pong: ping_id {pong.ping_id}")
    await sender.disconnect()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
