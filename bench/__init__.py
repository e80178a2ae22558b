"""Benchmarks: fastdeploy_otel against FastDeploy's legacy trace.log path.

``python -m bench [--quick] [--json FILE]``; see docs/BENCHMARKS.md.
"""
