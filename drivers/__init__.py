"""vmresize.drivers."""
