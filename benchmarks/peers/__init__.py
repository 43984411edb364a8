"""Workers for ``benchmarks/bench_vs_peers.py``, each run by a peer's own venv python.

``litert_torch_worker.py`` (litert-torch venv) and ``executorch_worker.py``
(ExecuTorch venv) are scripts, not imports of edgepack: those venvs lack
edgepack's dependencies.  ``_common.py`` is what they share (standard library,
numpy and ``ai_edge_litert`` only); the main process imports it too, so every
side goes through the same timing loop.
"""
