"""The Nova-compatible compute API (v2.1 with microversions) that `vmresize up` serves.

`app.build_app` is the ASGI application; `service` runs it on Ray Serve (or one
uvicorn process) beside the cluster; `views` builds Nova's JSON shapes from the
projections; `auth` is the Keystone-v3-shaped token endpoint and Nova's default
policy. It drives the cluster through the public Python API (`Cluster`) only.
"""
