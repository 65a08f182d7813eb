"""The tokiwa worker process: consumer runner, relay, process management."""
