"""distrain: distributed training on Ray and DeepSpeed, from one CPU process to a GPU cluster."""

import os
import sys

# Arrow's default memory pool on Linux (mimalloc) takes fresh memory from the system for the first
# row groups of every open parquet reader: with a rank's 64 partitions reading at once, their first
# reads can cost several times the later ones. jemalloc (in pyarrow's Linux wheels) reuses memory from
# the start. Arrow reads the variable once, when pyarrow is first imported; a pool the user chose is
# kept.
if sys.platform == "linux":
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
