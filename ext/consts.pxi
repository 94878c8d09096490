# Tunables and fixed sizes shared by the compiled modules, with their units.

DEF LEN_PREFIX_BYTES = 4  # bytes: length prefix of one BYTES tensor element (OIP)
