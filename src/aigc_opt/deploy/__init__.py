"""Deploy a saved Model on Ray (extra ``[ray]``): batch inference on Ray Data, online serving on
Ray Serve, each with ``ao.monitor``'s metrics aggregated across its actors.

Example:
    >>> out, mon = ao.deploy.ray_data("model/", ds, batch_size=32)        # doctest: +SKIP
    >>> served = ao.deploy.ray_serve("model/", route="/predict").run(port=8000)  # doctest: +SKIP

This package sits above Core, Measuring and ``monitor``; nothing in the library imports it.
Importing it imports no Ray: each function does, and a missing Ray raises
``MissingDependencyError`` with the ``pip install`` line.
"""

from ._common import ClusterMonitor, MonitorSettings
from .ray_data import ray_data
from .ray_serve import ServeApp, ray_serve

__all__ = ["ray_data", "ray_serve", "ServeApp", "ClusterMonitor", "MonitorSettings"]
