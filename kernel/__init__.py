"""AIOS Kernel: a gRPC inference-and-decision kernel.

Import submodules directly (``kernel.server``, ``kernel.models``...); this
package root stays light so ``import kernel`` costs nothing.
"""

__version__ = "0.1.0"
