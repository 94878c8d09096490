# Compiled twin of kernel/infer_scan.py: what a ModelInferRequest's bytes would make protobuf hold, counted.
# Declarations only; see infer_scan.pyx.

from libc.stdint cimport uint64_t

cpdef object scan(bytes data, long long max_strings, long long max_typed, long long max_dims)
cpdef tuple entries(bytes data)
cpdef long long field_count(bytes data, uint64_t wanted, uint64_t within=*) except -2
