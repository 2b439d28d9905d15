"""`python -m layerfusion` / `layerfusion`: `models`, `report`, `reproduce`, `analyze`, `classify`, `serve`, or a LightningCLI
subcommand (fit, validate, test, predict)."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch our own subcommands; everything else goes to the Lightning CLI.

    Errors about the user's data, config or models print as one line (set LAYERFUSION_DEBUG=1 for the traceback).
    Only the Lightning subcommands import Lightning (~12 s).
    """
    from layerfusion.errors import LayerFusionError

    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else None
    try:
        if command == "models":
            from layerfusion.encoders.offline import main as models_main

            sys.exit(models_main(args[1:], prog="layerfusion models"))
        if command == "report":
            from layerfusion.report import main as report_main

            sys.exit(report_main(args[1:]))
        if command == "reproduce":
            from layerfusion.reproduce import main as reproduce_main

            sys.exit(reproduce_main(args[1:]))
        if command == "analyze":
            from layerfusion.analysis import main as analyze_main

            sys.exit(analyze_main(args[1:]))
        if command == "classify":
            from layerfusion.classify import main as classify_main

            sys.exit(classify_main(args[1:]))
        if command == "serve":
            from layerfusion.serve import main as serve_main

            sys.exit(serve_main(args[1:]))

        from layerfusion.cli import cli_main

        cli_main(argv)  # None: LightningCLI reads sys.argv itself
    except LayerFusionError as err:
        if os.environ.get("LAYERFUSION_DEBUG"):
            raise
        print(f"layerfusion: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
