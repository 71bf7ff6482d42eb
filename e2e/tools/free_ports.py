"""TCP ports that are free now on every address, below the ephemeral range: a port probed
free inside it can be taken by an outgoing connection before the caller binds it.

    python3 e2e/tools/free_ports.py COUNT

The gateway e2e imports `pick` with its own range and the ports it already handed out.
"""

import random
import socket
import sys


def pick(count: int, low: int = 21000, high: int = 26000, taken: set[int] | None = None) -> list[int]:
    """`count` distinct ports in [low, high) that bind now and are not in `taken` (which
    gets them added)."""
    taken = set() if taken is None else taken
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(low, high)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        taken.add(port)
        ports.append(port)
    return ports


if __name__ == "__main__":
    print(*pick(int(sys.argv[1])))
