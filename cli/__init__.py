"""The `vmresize` command line and the demo: argument parsing, output for people and
machines, and one function per command. Offline commands (`audit`, `events`) import no
Ray; the rest reach the cluster through `vmresize.actors.Cluster`.
"""
