"""hypercorn's settings, from Cohort's: the Procfile runs `hypercorn --config python:server.hypercorn_config`.

The bind address and the graceful timeout, which follows COHORT_DRAIN_TIMEOUT_S (plus a margin
for the front's own drain to end every stream with an error event and `[DONE]` first). Flags
given on the command line still win. The idle keep-alive timeout is not hypercorn's: its timer
costs a task per response and did not work under quart-trio; server/connections.py keeps
COHORT_KEEP_ALIVE_S instead.
"""

import logging
import resource

from common.config import ServerSettings, load

_settings = load(ServerSettings)

worker_class = "trio"
bind = [f"{_settings.host}:{_settings.port}"]
graceful_timeout = _settings.drain_timeout_s + 5.0
keep_alive_timeout = 10 * 365 * 86400.0  # COHORT_KEEP_ALIVE_S is kept by server/connections.py
# hypercorn's own messages go through Cohort's log format, once (its own handler printed "Running
# on ..." a second time, in its format)
errorlog = logging.getLogger("hypercorn.error")
backlog = 1024  # hypercorn's 100 let a burst of 300 connects meet resets before any was read


def _more_descriptors() -> None:
    """Every connection is a descriptor: take the hard limit, not the soft one (often 1,024), so
    the connection bound (server/connections.py) sits as high as the machine allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_more_descriptors()
