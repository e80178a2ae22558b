"""The start-up hook directory that ``fastdeploy-otel run`` puts first on PYTHONPATH."""
