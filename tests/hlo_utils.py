"""Shared helper of the tests that read compiled XLA HLO text."""

from __future__ import annotations

import re
from collections.abc import Iterator

_COMPUTATION = re.compile(r"^%([\w.\-]+) ([^\n]*)\{\n(.*?)\n\}", re.M | re.S)


def computations(compiled) -> Iterator[tuple[str, str, str]]:
  """(name, signature, body) of every non-entry computation of a compiled executable: the
  signature is "(params) -> result " and the body its instruction lines."""
  for m in _COMPUTATION.finditer(compiled.as_text()):
    yield m.group(1), m.group(2), m.group(3)
