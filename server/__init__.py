"""loraplex.server: the serving side of loraplex, and the two formats training shares with it.

Subpackages that training may import (the shared formats): ``basemodel`` (which base, its
fingerprint, how it loads) and ``store`` (the adapter store's on-disk format). Everything else
in this package (engine, scheduler, APIs) is private to serving.
"""

__version__ = "0.1.0"
