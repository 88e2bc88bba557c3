"""hypercorn's settings, from Cohort's: the Procfile runs `hypercorn --config python:server.hypercorn_config`.

The bind address, and the graceful timeout, which follows COHORT_DRAIN_TIMEOUT_S (plus a margin
for the front's own drain to end every stream with an error event and `[DONE]` first). Flags
given on the command line still win. (hypercorn's `keep_alive_timeout` is left alone: its trio
worker did not close an idle keep-alive connection with it set to 2 s, in a test of 8 s.)
"""

import resource

from common.config import ServerSettings, load

_settings = load(ServerSettings)

worker_class = "trio"
bind = [f"{_settings.host}:{_settings.port}"]
graceful_timeout = _settings.drain_timeout_s + 5.0


def _more_descriptors() -> None:
    """Every connection is a descriptor: take the hard limit, not the soft one (often 1,024), so
    idle keep-alive clients cannot crowd out the ones at work before their timeout closes them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_more_descriptors()
