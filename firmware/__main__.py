"""Command line: ``python -m firmware --port URL --policy FILE [options]``.

Exit status: 0 done, 1 the card or its link failed (one line on stderr), 2 bad arguments or
a bad policy (one line on stderr naming the problem).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import NoReturn, Sequence

PROG = "firmware"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:        # one line, not usage + message
        self.exit(2, f"{PROG}: error: {message}\n")


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(prog=f"python -m {PROG}",
                description="Management firmware of the offcard: placement, QoS, event log.")
    p.add_argument("--port", metavar="URL",
                   help="management UART: a pyserial URL (socket://host:port, loop://, a pty "
                        "or /dev/ttyUSB0); required unless --check")
    p.add_argument("--policy", metavar="FILE", required=True, help="policy TOML file")
    p.add_argument("--state", metavar="FILE", help="state file (overrides [state] path)")
    p.add_argument("--log", metavar="FILE", help="event log (overrides [log] path)")
    p.add_argument("--run-for-us", metavar="N", type=_positive_float,
                   help="stop after N microseconds of card time")
    p.add_argument("--max-polls", metavar="N", type=_positive_int, help="stop after N polls")
    p.add_argument("--link-timeout", metavar="S", type=_positive_float, default=5.0,
                   help="seconds to wait for each reply from the card (default 5; a card in a "
                        "loaded simulator answers in wall time many times slower than silicon)")
    p.add_argument("--check", action="store_true", help="only validate the policy")
    args = p.parse_args(argv)
    if not args.check and not args.port:
        p.error("--port is required (unless --check)")
    return args


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s!r}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s!r}")
    return v


def _fail(code: int, message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)

    from .policy import PolicyError, load_policy
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        return _fail(2, str(e))
    if args.state:
        policy = dataclasses.replace(policy, state_path=args.state)
    if args.log:
        policy = dataclasses.replace(policy, log_path=args.log)
    if args.check:
        print(f"{args.policy}: ok: {len(policy.tasks)} task(s), strategy {policy.strategy}")
        return 0

    from .card import Card, CardError
    from .daemon import Firmware
    from .eventlog import LogError
    from .state import StateError
    try:
        from .link import LinkError, UartLink
    except ImportError as e:
        return _fail(1, f"the UART link is not available: {e}")

    link = None
    try:
        link = UartLink(args.port, timeout=args.link_timeout)
        link.sync()                          # (a dead process's last reply may be under way)
        fw = Firmware(Card(link), policy)

        def stop(signum, frame):            # finish the poll under way (a pop is logged)
            fw.stop_requested = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        with fw:
            polls = fw.run(stop_after_us=args.run_for_us, max_polls=args.max_polls)
        placement = " ".join(f"{k}={v}" for k, v in sorted(fw.placement.items()))
        print(f"{PROG}: {polls} polls, {fw.served} requests served by the card; {placement}")
        return 0
    except KeyboardInterrupt:
        return 0
    except (LinkError, OSError) as e:
        return _fail(1, f"link {args.port}: {e}")
    except (CardError, StateError, LogError) as e:
        return _fail(1, str(e))
    finally:
        if link is not None:
            try:
                link.close()
            except Exception:
                pass


if __name__ == "__main__":
    sys.exit(main())
