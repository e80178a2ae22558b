"""Interpreter start-up hook used by ``fastdeploy-otel run``: instrument FastDeploy in every Python process.

``run`` puts this directory first on PYTHONPATH, so each interpreter the command starts (and each one
those start: multiprocessing spawn, subprocess) imports this module at start-up.  It first runs any
sitecustomize that was there before (another tool's, or the system's), then instruments.  Without
FastDeploy installed, instrument() does nothing; without FastDeploy imported, it only waits.
"""


def _chain_previous() -> None:
    """Import the sitecustomize this one shadows, if any."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _instrument() -> None:
    from fastdeploy_otel.instrumentor import FastDeployInstrumentor

    FastDeployInstrumentor().instrument()


for _step in (_chain_previous, _instrument):
    try:
        _step()
    except Exception as _exc:  # start-up must go on untraced rather than fail
        import sys as _sys

        print(f"fastdeploy-otel: start-up hook step {_step.__name__} failed: {_exc!r}", file=_sys.stderr)
