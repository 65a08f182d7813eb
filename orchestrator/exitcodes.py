"""Named exit codes of the CLIs."""

OK = 0
FAILURE = 1          # a run failed, or an unexpected error
USAGE = 2            # bad arguments or configuration (click uses 2 as well)
UNAVAILABLE = 69     # Redis unreachable (EX_UNAVAILABLE)
FORCED = 130         # a second SIGINT/SIGTERM: exit at once without waiting for in-flight work
