"""A stand-in for FastDeploy 2.x (PaddlePaddle/FastDeploy), for fastdeploy-otel's tests only.

FastDeploy cannot be installed here, so this package reproduces the public shape that the
instrumentor depends on: module paths, function signatures and the order of the tracing calls
(``fastdeploy.trace.trace_logger.print``, ``fastdeploy.metrics.trace``, ``Request.from_dict``,
``trace_carrier``), in both of FastDeploy's import styles.  It is written from the project's notes
on FastDeploy (``shared/reference/fastdeploy_tracing.md``), copies none of its code, and serves no
model: the "engine" sleeps instead of computing.
"""
