"""`python -m tokentrain.train CFG ...`: the train command as a module, for launchers.

`torchrun` / `python -m torch.distributed.launch` start it once per rank; the older
launcher passes `--local-rank=N` (or `--local_rank N`), which is accepted and ignored in
favour of the LOCAL_RANK environment variable it also sets (set from the flag if absent).
"""

from __future__ import annotations

import os
import sys


def strip_local_rank(argv: list[str]) -> tuple[list[str], str | None]:
    out, value, skip = [], None, False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("--local-rank", "--local_rank"):
            value = argv[i + 1] if i + 1 < len(argv) else None
            skip = True
        elif a.startswith(("--local-rank=", "--local_rank=")):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
    return out, value


def main(argv: list[str] | None = None, *, as_process: bool = False) -> int:
    from tokentrain.cli.main import main as cli_main  # it records the exit code for spawn_torchrun

    args, local_rank = strip_local_rank(sys.argv[1:] if argv is None else argv)
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = local_rank
    debug = [a for a in args if a == "--debug"]
    rest = [a for a in args if a != "--debug"]
    return cli_main([*debug, "train", *rest], as_process=as_process)


if __name__ == "__main__":
    raise SystemExit(main(as_process=True))
