"""Compiled (Cython) extensions, built from ext/ by setup.py; import them through kernel.accel."""
