# Compiled twin of kernel/bytes_codec.py: BYTES tensor (de)serialisation.
# Declarations only; see bytes_codec.pyx for the why.

cpdef list decode(bytes buf, Py_ssize_t count)
cpdef bytes encode(object items)
