"""Named exit codes of the CLIs."""

OK = 0
FAILURE = 1          # a run failed, or an unexpected error
USAGE = 2            # bad arguments or configuration (click uses 2 as well)
UNAVAILABLE = 69     # Redis unreachable (EX_UNAVAILABLE)
TEMPFAIL = 75        # Redis refused for now: full (maxmemory), failing over, busy (EX_TEMPFAIL)
NOPERM = 77          # Redis refused the password or an ACL rule (EX_NOPERM)
FORCED = 130         # a second SIGINT/SIGTERM: exit at once without waiting for in-flight work
