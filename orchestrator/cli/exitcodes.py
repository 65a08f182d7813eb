"""Named exit codes of the CLIs (the sysexits.h numbers where one fits).

Every command of ``tokiwa-producer`` and ``tokiwa-worker`` ends with one of these; an error
is one ``error: ...`` line on stderr naming the problem and the setting to check
(``orchestrator.cli.producer.report_error``), with a traceback only under ``--debug`` /
``TOKIWA_DEBUG=1``.
"""

OK = 0
FAILURE = 1          # a run failed, a confirmation was refused, or an unexpected error
USAGE = 2            # bad arguments or configuration: flags, settings, config file, --app (click uses 2 as well)
UNAVAILABLE = 69     # Redis unreachable: refused, unknown host, no answer (EX_UNAVAILABLE)
TEMPFAIL = 75        # try again later: Redis full (maxmemory), failing over, busy, loading; a --wait that timed out (EX_TEMPFAIL)
PROTOCOL = 76        # the TLS handshake failed: certificate not trusted, TLS to a plain-text Redis or the reverse (EX_PROTOCOL)
NOPERM = 77          # Redis refused the password or an ACL rule (EX_NOPERM)
FORCED = 130         # a second SIGINT/SIGTERM: exit at once without waiting for in-flight work
