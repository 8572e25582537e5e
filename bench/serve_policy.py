"""``python bench/serve_policy.py MAX_PASSES``: ``fategen serve`` with another affinity limit.

The same CLI and service as ``python -m fategen serve``; only `FairPolicy`'s ``max_passes``
changes (0: pure fair turns, no model affinity), so the swap scenario can compare orders.
"""

from __future__ import annotations

import sys
from typing import Any

import fategen.service
from fategen import cli
from fategen.core.policy import FairPolicy


def main() -> int:
    max_passes = int(sys.argv[1])

    class Policy(FairPolicy):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**{**kwargs, "max_passes": max_passes})

    fategen.service.FairPolicy = Policy  # type: ignore[misc]
    return cli.main(["serve"])


if __name__ == "__main__":
    sys.exit(main())
