"""`adapters ui RUNS_DIR`: the web page over a folder of training runs, without a model."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import AdaptersError
from .common import existing_dir, port


def _add_ui(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", metavar="RUNS_DIR", type=existing_dir,
                   help="the folder whose training runs, eval reports and adapters to show")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=port, default=8000, help="default 8000; 0: any free port")
    p.add_argument("--api-key", default=os.environ.get("ADAPTERS_API_KEY") or None,
                   help="require `Authorization: Bearer KEY` for the page's data (default: "
                        "$ADAPTERS_API_KEY)")


def cmd_ui(args: argparse.Namespace) -> int:
    try:  # here, not at the top: fastapi/uvicorn are the optional `serve` extra
        from ..serving.server import serve
        from ..serving.ui import create_ui_app
    except ImportError as e:
        raise AdaptersError(f"adapters ui needs the serve extra: pip install "
                            f"'adapterkit[serve]' ({e})") from None

    app = create_ui_app(args.runs, api_key=args.api_key)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving {args.runs} on {args.host} without --api-key: anyone who can "
              "reach this port can read its runs", file=sys.stderr)
    print(f"runs in {args.runs} on http://{args.host}:{args.port}/", flush=True)
    serve(app, args.host, args.port)
    return 0


# name -> (add its flags, run it); each one's help line is in the table of cli/__init__.py
COMMANDS = {
    "ui": (_add_ui, cmd_ui),
}
