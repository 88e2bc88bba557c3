"""hypercorn's settings, from Cohort's: the Procfile runs `hypercorn --config python:server.hypercorn_config`.

The bind address, and the two timeouts that decide what a shutdown and an idle client cost: the
graceful timeout follows COHORT_DRAIN_TIMEOUT_S (plus a margin for the front's own drain to end
every stream with an error event and `[DONE]` first), and idle keep-alive connections close after
COHORT_KEEP_ALIVE_S. Flags given on the command line still win.
"""

from common.config import ServerSettings, load

_settings = load(ServerSettings)

worker_class = "trio"
bind = [f"{_settings.host}:{_settings.port}"]
graceful_timeout = _settings.drain_timeout_s + 5.0
keep_alive_timeout = _settings.keep_alive_s
