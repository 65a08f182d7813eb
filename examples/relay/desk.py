"""A shipping desk child process under the relay: reads ``orders.shipped:<ref>`` lines on
stdin and answers ``desk.ack:<ref> packed`` on stdout (Miclow's ``topic:message`` lines)."""

import sys

for line in sys.stdin:
    topic, _, message = line.rstrip("\n").partition(":")
    if topic == "orders.shipped":
        print(f"desk.ack:{message.strip()} packed", flush=True)
