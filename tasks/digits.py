"""The classes digitflow tells apart: the ten digits, named "0" to "9"."""

from __future__ import annotations

N_CLASSES = 10
# Their names: in a model file, the inbox's folders (data/labeled/<digit>/), the outputs
CLASSES = tuple(str(d) for d in range(N_CLASSES))
