"""The descriptor pool server reflection answers from, with methods as symbols.

The reflection protocol's ``file_containing_symbol`` takes ``<package>.<service>[.<method>]`` or a type, and
``grpcurl describe inference.GRPCInferenceService.ModelInfer`` asks it for a method. grpcio-reflection looks
the name up with ``DescriptorPool.FindFileContainingSymbol``, which finds services, messages, fields and enums
but not methods, so that describe failed "Symbol not found" (reflection answered NOT_FOUND) while
``describe inference.GRPCInferenceService`` worked. ``MethodSymbols`` answers a method with its service's file
and passes everything else to the pool.
"""

from __future__ import annotations


class MethodSymbols:
    """``pool`` as reflection reads it, where a service's method is a symbol of the service's file."""

    __slots__ = ("_pool",)

    def __init__(self, pool):
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802  (the DescriptorPool method it stands for)
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str):  # FindFileByName, FindMessageTypeByName, FindAllExtensions, ...
        return getattr(self._pool, name)
