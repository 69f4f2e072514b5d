"""One module per file on the volume, the only code that opens it or knows its keys.

Each holds a frozen dataclass, the FORMAT_VERSION it writes, a strict `read` (types, ranges, finite
numbers; the older formats users' volumes hold are upgraded on the way in) and an atomic `write`.
A malformed file is one PipelineError naming the file and what is wrong with it.
"""
