"""The deterministic simulator: the real host shells and controller in one process under
a virtual clock, with seeded faults (`simulator.py`, `vclock.py`).
"""
