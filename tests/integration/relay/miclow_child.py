"""A relay child that talks the way Miclow's Python client does (used by the Miclow-mode tests).

It reads Miclow's counted stdin records exactly as the client does (``input()`` for the topic,
``int(input())`` for the count, then that many ``input()`` lines), so a record in another
framing makes it crash, as it would crash a Miclow script; and it writes Miclow's quoted forms.

Environment (all optional):
  CHILD_REPLY    topic it reports on (default ``echo``)
  CHILD_CONTROL  topic whose data lines it prints verbatim (default ``say``): the test decides
                 what the child writes

It starts by reporting ``{"ready": MICLOW_TASK_ID, "argv": [...]}``; every other record it
receives is reported as ``{"topic": ..., "lines": [...]}``, written as a ``"echo"::`` block.
A function input record (``system.function``: caller, data lines) is answered with
``system.return`` carrying ``<caller>|<data>``. End of file on stdin ends it (exit 0).
"""

import json
import os
import sys

REPLY = os.environ.get("CHILD_REPLY", "echo")
CONTROL = os.environ.get("CHILD_CONTROL", "say")


def block(topic: str, text: str) -> None:
    print(f'"{topic}"::')
    print(text)
    print(f'::"{topic}"')
    sys.stdout.flush()


def report(obj: dict) -> None:
    block(REPLY, json.dumps(obj))


def main() -> None:
    report({"ready": os.environ.get("MICLOW_TASK_ID", ""), "argv": sys.argv[1:]})
    while True:
        try:
            topic = input()
        except EOFError:
            return
        lines = [input() for _ in range(int(input()))]
        if topic == CONTROL:
            for line in lines:
                print(line)
            sys.stdout.flush()
        elif topic == "system.function":
            block("system.return", f"{lines[0]}|" + "\n".join(lines[1:]))
        else:
            report({"topic": topic, "lines": lines})


if __name__ == "__main__":
    main()
