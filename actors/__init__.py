"""vmresize.actors."""
