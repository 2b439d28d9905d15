"""`python -m layerfusion` / `layerfusion`: `models`, `report`, `reproduce`, or a LightningCLI subcommand (fit, validate, test, predict)."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch `models` to the offline model installer, everything else to the Lightning CLI.

    Errors about the user's data, config or models print as one line (set LAYERFUSION_DEBUG=1 for the traceback).
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["models"]:
        from layerfusion.encoders.offline import main as models_main

        sys.exit(models_main(args[1:], prog="layerfusion models"))
    if args[:1] == ["report"]:
        from layerfusion.report import main as report_main

        sys.exit(report_main(args[1:]))
    from layerfusion.cli import cli_main
    from layerfusion.errors import LayerFusionError

    try:
        if args[:1] == ["reproduce"]:
            from layerfusion.reproduce import main as reproduce_main

            sys.exit(reproduce_main(args[1:]))
        cli_main(argv)  # None: LightningCLI reads sys.argv itself
    except LayerFusionError as err:
        if os.environ.get("LAYERFUSION_DEBUG"):
            raise
        print(f"layerfusion: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
