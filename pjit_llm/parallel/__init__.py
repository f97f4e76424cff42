"""Parallelism: the mesh axes, the device mesh, logical-to-mesh sharding rules and the
multi-process runtime."""
