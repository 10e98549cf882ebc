"""`python -m harvest` has no commands: the dense-retrieval data selection is `python -m sae select`.

It moved there so that its flags come from the same config-to-CLI code as train and eval (sae.config_cli)
without harvest, the lower layer, importing sae. This stub turns the old command line into the new one.
"""

from __future__ import annotations

import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    """Print the `python -m sae` command to run instead (same flags) on stderr; exit code 2, a usage error."""
    args = sys.argv[1:] if argv is None else argv
    instead = shlex.join(["python", "-m", "sae", *args]) if args[:1] == ["select"] else "python -m sae select --help"
    print(
        f"python -m harvest has no commands: data selection is `python -m sae select` (same flags); run\n  {instead}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
