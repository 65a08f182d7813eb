"""A relay child that publishes ``ping:<n>`` every PING_INTERVAL_S seconds (default 1)
and prints every record it receives on stderr (shown with ``view_stderr = true``)."""

import os
import sys
import threading
import time


def read_stdin() -> None:
    for line in sys.stdin:
        sys.stderr.write(f"got {line}")
        sys.stderr.flush()


def main() -> None:
    threading.Thread(target=read_stdin, daemon=True).start()
    interval = float(os.environ.get("PING_INTERVAL_S", "1"))
    count = int(os.environ.get("PING_COUNT", "0"))  # 0 = forever
    n = 0
    while count == 0 or n < count:
        n += 1
        print(f"ping:{n}", flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
