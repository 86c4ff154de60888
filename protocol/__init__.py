"""The resize and lifecycle protocol: the commands the controller sends to hosts and
their replies. Pure: no Ray, no I/O; imported by `actors/` and `projections/` alike.
"""
