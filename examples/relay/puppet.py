"""A relay child that does what it is told (used by the tests and the demo).

Environment (all optional):
  PUPPET_REPLY    topic it answers on (default ``echo``)
  PUPPET_CONTROL  topic whose messages it prints verbatim on stdout (default ``say``);
                  ``!exit N`` makes it exit with code N, ``!stderr TEXT`` prints TEXT on stderr
  PUPPET_FRAMING  ``line`` (default) or ``counted``: how it reads its stdin
  PUPPET_STALL    when set, it never reads stdin (a slow child)

Every other record it receives is echoed as ``{reply}:{topic}|{message}`` (in counted
framing the message is the JSON list of its data lines). It starts by printing
``{reply}:ready|{MICLOW_TASK_ID}``.
"""

import json
import os
import sys
import time

REPLY = os.environ.get("PUPPET_REPLY", "echo")
CONTROL = os.environ.get("PUPPET_CONTROL", "say")


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def control(message: str) -> None:
    if message.startswith("!exit "):
        sys.exit(int(message.split()[1]))
    if message.startswith("!stderr "):
        sys.stderr.write(message[len("!stderr "):] + "\n")
        sys.stderr.flush()
        return
    # "\n" written as the two characters backslash-n becomes a real newline (block form tests)
    out(message.replace("\\n", "\n"))


def records_line():
    for raw in sys.stdin:
        topic, _, message = raw.rstrip("\n").partition(":")
        yield topic, message


def records_counted():
    while True:
        topic = sys.stdin.readline()
        if not topic:
            return
        count = int(sys.stdin.readline())
        lines = [sys.stdin.readline().rstrip("\n") for _ in range(count)]
        yield topic.rstrip("\n"), lines


def main() -> None:
    out(f"{REPLY}:ready|{os.environ.get('MICLOW_TASK_ID', '')}")
    if os.environ.get("PUPPET_STALL"):
        while True:
            time.sleep(3600)
    counted = os.environ.get("PUPPET_FRAMING") == "counted"
    for topic, message in records_counted() if counted else records_line():
        if topic == CONTROL:
            control(message if isinstance(message, str) else "\n".join(message))
        else:
            shown = json.dumps(message) if counted else message
            out(f"{REPLY}:{topic}|{shown}")


if __name__ == "__main__":
    main()
