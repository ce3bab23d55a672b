"""How every command-line entry point reports a user's mistake: one line on stderr, exit status 2.

    if __name__ == "__main__":
        with user_errors():            # or decorate main with @user_errors()
            main()

A user's mistake is what the library raises about its input: a ValueError (our checks raise it with the file,
row or flag and the fix in the message; json.JSONDecodeError and UnicodeDecodeError are ValueErrors too), or a
path that is missing, a folder where a file should be or the reverse, a file that cannot be read. Those print
`error: <message>` and exit 2, like argparse. Every other exception (TypeError, AttributeError, torch's
RuntimeError, ...) is a bug on our side and keeps its traceback. Ctrl-C prints `interrupted` and exits 130
(128 + SIGINT, as shells report it).

Set QLORA_TRACEBACK=1 to re-raise instead and see where a user error came from. The price of the rule: a bug
that raises ValueError (a bad tuple unpacking, say) also prints as one line; that variable shows it whole.
"""
from __future__ import annotations

import contextlib
import os
import sys

from .models import MissingModelPackage

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               MissingModelPackage)
USAGE_EXIT, INTERRUPTED_EXIT = 2, 130


def message(e: BaseException) -> str:
    """One line: `path: reason` for an OSError from the system, else the exception's text with its newlines
    folded (a multi-line message would read as several errors)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def user_errors():
    """Turn a user's mistake into `error: <message>` and exit 2; see the module docstring."""
    try:
        yield
    except (*USER_ERRORS, KeyboardInterrupt) as e:
        if os.environ.get("QLORA_TRACEBACK") == "1":
            raise
        interrupted = isinstance(e, KeyboardInterrupt)
        print("interrupted" if interrupted else f"error: {message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT if interrupted else USAGE_EXIT) from None
