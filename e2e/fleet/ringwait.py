"""Waits until every given process log shows its ring set to exactly MEMBERS by
a discovery update logged after T0, and prints the delay from T0 per log.

    python ringwait.py T0 MEMBERS TIMEOUT LOG [LOG ...]

T0 is a Unix time (seconds, fractional); MEMBERS is comma-separated
`host:port`. The line is the one the gateway and mtproto-session log
(`session ring updated from EndpointSlices ... members=[...]`), with the
timestamp tracing puts first. Prints `LOG MILLISECONDS` lines; exits 1 on
timeout, naming the logs that never got there.
"""

import re
import sys
import time
from datetime import datetime

LINE = re.compile(r"^(\S+)\s.*session ring updated from EndpointSlices.*members=\[([^\]]*)\]")


def changes(path):
    """(unix time, member set) of every ring update in the log."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                at = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
                members = frozenset(x.strip().strip('"') for x in m.group(2).split(",") if x.strip())
                out.append((at, members))
    return out


def main():
    t0, members, timeout, logs = float(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4:]
    want = frozenset(m for m in members.split(",") if m)
    found = {}
    end = time.time() + timeout
    while True:
        for log in logs:
            if log not in found:
                hit = [at for at, got in changes(log) if at >= t0 and got == want]
                if hit:
                    found[log] = hit[0]
        if len(found) == len(logs) or time.time() > end:
            break
        time.sleep(0.05)
    for log in logs:
        if log in found:
            print(f"{log} {(found[log] - t0) * 1000:.0f}")
    missing = [log for log in logs if log not in found]
    if missing:
        print(f"ring never became {sorted(want)} in: {' '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
