"""``python -m loraplex.training.inspect_data FILE``: read a data file the way ``train-adapter``
does and print ``{"records": N, "fields": [...]}`` as one JSON line (exit 0), or the trainer's
own error message on stderr (exit 2).

The web console runs this in a subprocess to check an upload, so that the server never imports
the training package (import contract ``server-not-training``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m loraplex.training.inspect_data FILE", file=sys.stderr)
        return 2
    from loraplex.server.errors import LoraplexError
    from loraplex.training.data import load_records

    try:
        records = load_records([Path(args[0])])
    except LoraplexError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    fields = sorted({k for r in records[:200] for k in r})
    print(json.dumps({"records": len(records), "fields": fields}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
