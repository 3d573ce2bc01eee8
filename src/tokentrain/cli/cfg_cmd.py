"""`tokentrain list-cfg [-p PATTERN]`, `tokentrain copy-cfg NAME DIR` (shipped templates) and
`tokentrain demo [DIR]` (the demo's model, data and config, outside a checkout too)."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("list-cfg", help="list the shipped config templates", parents=[common])
    p.add_argument("-p", "--pattern", help="only names containing PATTERN (or matching a shell glob)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("copy-cfg", help="copy a config template to DIR/NAME_copy.py", parents=[common])
    p.add_argument("name", metavar="NAME")
    p.add_argument("dest", metavar="DIR")
    p.add_argument("--force", action="store_true", help="overwrite DIR/NAME_copy.py if it exists")
    p.set_defaults(func=cmd_copy)

    p = sub.add_parser(
        "demo",
        help="write the demo (tiny model, tokenized chat data, tiny_demo config) into DIR",
        parents=[common],
    )
    p.add_argument("dest", metavar="DIR", nargs="?", default="tokentrain_demo", help="default ./tokentrain_demo")
    p.add_argument("--force", action="store_true", help="replace an earlier demo in DIR")
    p.set_defaults(func=cmd_demo)


def cmd_list(args) -> int:
    from tokentrain.config.templates import list_templates

    names = list_templates(args.pattern)
    for n in names:
        print(n)
    return 0


def cmd_copy(args) -> int:
    """Never overwrites an (edited) earlier copy unless --force."""
    from pathlib import Path

    from tokentrain.config.templates import copy_template, template_path
    from tokentrain.errors import ConfigError

    dest = Path(args.dest) / f"{template_path(args.name).stem}_copy.py"
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} exists (an earlier copy, maybe edited); remove it, copy elsewhere, or pass --force")
    try:
        print(f"Copied to {copy_template(args.name, args.dest)}")
    except OSError as e:  # a read-only or missing DIR, a file where a folder should be
        raise ConfigError(f"copy-cfg: cannot write {dest} ({e.strerror}); give a folder you can write in") from None
    return 0


def cmd_demo(args) -> int:
    from tokentrain.tools.demo import write_demo

    cfg = write_demo(args.dest, args.force)
    print(f"Wrote the demo into {args.dest}: demo/tiny-llama (config-only model), demo_out/data, {cfg.name}")
    print(f"Train it:  cd {args.dest} && tokentrain train {cfg.name} --work-dir work")
    return 0
