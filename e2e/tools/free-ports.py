"""Prints COUNT distinct TCP ports that are free now on every address, below the ephemeral
range: a port probed free inside it can be taken by an outgoing connection before the caller
binds it.

    python3 e2e/tools/free-ports.py COUNT
"""

import random
import socket
import sys

ports: list[int] = []
while len(ports) < int(sys.argv[1]):
    port = random.randrange(21000, 26000)
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            continue
    if port not in ports:
        ports.append(port)
print(*ports)
