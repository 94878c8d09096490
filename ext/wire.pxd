# Compiled twin of kernel/wire.py: re-tagging a field's occurrences in protobuf wire bytes.
# Declarations only; see wire.pyx.

cpdef bytes retag(bytes data, long long field, long long new_field)
