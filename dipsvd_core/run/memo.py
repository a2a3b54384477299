"""What a pass made that is kept in memory for the run: BO's objectives (with their model copies), Dobi-SVD's
training. A pass's own disk cache, if it has one, lives inside the `make` it gives."""
from __future__ import annotations


class Memo:
    def __init__(self):
        self._values: dict[tuple, object] = {}  # (kind, key) -> value

    def get(self, kind: str, key, make, keep=lambda value: True):
        """What `make()` returns, made once per (kind, key) and kept while `keep(value)` says so."""
        if (kind, key) not in self._values:
            value = make()
            if not keep(value):
                return value
            self._values[(kind, key)] = value
        return self._values[(kind, key)]

    def has(self, kind: str, key) -> bool:
        return (kind, key) in self._values

    def drop(self, kind: str, where) -> None:
        """Forget every value of `kind` whose key satisfies `where(key)`."""
        for k in [k for k in self._values if k[0] == kind and where(k[1])]:
            del self._values[k]
