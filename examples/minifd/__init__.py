"""minifd: a compact FastDeploy-shaped serving stack, traced with fastdeploy_otel.

API server (FastAPI) -> ZMQ -> engine process (scheduler, model runner, token processor threads)
-> ZMQ -> API server.  The model is a tiny Paddle transformer over a paged, two-tier KV cache.
"""
