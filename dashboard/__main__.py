"""`python -m dashboard [--host 127.0.0.1] [--port 8501] [--warehouse PATH]`: serve the dashboard.

Binds to 127.0.0.1 unless --host says otherwise. --host is resolved as a bind resolves it ("" and
0.0.0.0 are every interface, a name is looked up): when that reaches beyond this machine it refuses
to start without $ATLAS_TOKEN (dashboard/access.py), and the server checks its real sockets again at
start (dashboard/guard.py). Extra arguments after `--` go to `streamlit run`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dashboard.access import start_refusal

APP = Path(__file__).resolve().with_name("app.py")


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python -m dashboard`."""
    p = argparse.ArgumentParser(prog="python -m dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; any address other machines can "
                        "reach, \"\" and 0.0.0.0 included, needs ATLAS_TOKEN)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--warehouse", default=None, help="warehouse file (default $ATLAS_WAREHOUSE or "
                                                     "$ATLAS_HOME/warehouse.duckdb)")
    p.add_argument("streamlit_args", nargs="*", help="further `streamlit run` flags, after --")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    refusal = start_refusal(args.host)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if args.warehouse:
        os.environ["ATLAS_WAREHOUSE"] = args.warehouse
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           *args.streamlit_args]
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
