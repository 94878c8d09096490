# Compiled twin of kernel/audit/scan.py: the open's first pass over a segment's sound frames.
# Declarations only; see auditscan.pyx.

cpdef tuple scan_sound(bytes data, Py_ssize_t start, long long sequence, long long index_mask, long long number,
                       bytearray leaves, list index)
