"""Exit codes shared by every `agecam` command (listed in the README and in `agecam --help`)."""
from __future__ import annotations

OK = 0
FAILURE = 1  # the work failed while running: the daemon could not start or stop cleanly, a download failed
USAGE = 2  # bad arguments or config, or an input file missing or refused (a model or checkpoint failing its checks)
NO_EVENTS = 3  # `agecam events --timeout`: no event arrived in time
INTERRUPTED = 130  # Ctrl-C

TABLE = ((OK, "success"), (FAILURE, "runtime failure (could not start or stop cleanly, download failed)"),
         (USAGE, "usage, config or input error (bad arguments, invalid config, missing or refused file)"),
         (NO_EVENTS, "agecam events: no event within --timeout"), (INTERRUPTED, "interrupted (Ctrl-C)"))
