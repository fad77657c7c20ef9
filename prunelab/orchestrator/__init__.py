"""The orchestrator: CLI, sweep specs, scheduling on Ray, tracking and reports.

Kept free of imports so that ``prunelab --help`` and light tools stay fast; import the
submodules (``prunelab.orchestrator.spec``, ...) directly.
"""

__all__: list[str] = []
