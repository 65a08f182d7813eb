"""``python -m orchestrator.cli``: the ``tokiwa-producer`` command line."""

from orchestrator.cli.producer import main

main()
