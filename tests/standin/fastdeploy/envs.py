"""FastDeploy's environment variables, read when used (as fastdeploy.envs does)."""

import os

_DEFAULTS = {"FD_TRACE": "off", "FD_LOG_DIR": "log", "FD_SERVICE_NAME": "FastDeploy", "FD_HOST_NAME": "",
             "EXPORTER_OTLP_ENDPOINT": "", "EXPORTER_OTLP_HEADERS": ""}


def __getattr__(name: str) -> str:
    if name in _DEFAULTS:
        return os.getenv(name, _DEFAULTS[name])
    raise AttributeError(name)
