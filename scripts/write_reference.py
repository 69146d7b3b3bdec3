#!/usr/bin/env python
"""Write the generated parts of docs/reference.md from the code: every `conch-distill` and `conch-cortex serve` flag, every KDConfig
field, every signal's keyword arguments and the public API of the registry, CORTEX, EGO and the distiller.

    python3 scripts/write_reference.py            # rewrite the blocks between the GENERATED markers
    python3 scripts/write_reference.py --check    # exit 1 if docs/reference.md is out of date (the tests run this)

Each block sits between `<!-- GENERATED: name -->` and `<!-- END GENERATED -->`; the prose around them is
written by hand.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import conch_dna  # noqa: E402,F401  (optimized BLAS before mlx)

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
BLOCK = re.compile(r"(<!-- GENERATED: (\w+) -->\n)(.*?)(<!-- END GENERATED -->)", re.S)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cli_flags() -> str:
    from conch_dna.training.kd.cli import build_parser

    return flag_table(build_parser())


def cortex_flags() -> str:
    from conch_dna.cortex.server import parser

    serve = next(a for a in parser()._actions if a.choices and "serve" in a.choices).choices["serve"]
    return flag_table(serve)


def flag_table(parser) -> str:
    rows = ["| flag | value | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings:
            continue
        value = "{" + ", ".join(map(str, action.choices)) + "}" if action.choices else (action.metavar or "")
        if action.nargs == 0:
            value = ""
        elif not value:
            value = action.dest.upper()
        help_text = (action.help or "").replace("%(default)s", str(action.default))
        rows.append(f"| `{', '.join(action.option_strings)}` | {_cell(value)} | {_cell(help_text)} |")
    return "\n".join(rows)


def config_fields() -> str:
    from conch_dna.training.kd.config import config_fields as names
    from conch_dna.training.kd.config import field_info

    rows = ["| field | default | range or choices | environment | what it does |", "|---|---|---|---|---|"]
    for name in names():
        info = field_info(name)
        allowed = " \\| ".join(map(str, info.choices)) if info.choices else info.bounds
        env = "CONCH_KD_" + name.upper().replace(".", "__")
        rows.append(f"| `{name}` | `{_cell(info.default)}` | {_cell(allowed)} | `{env}` | {_cell(info.description)} |")
    return "\n".join(rows)


def documented_kwargs(signal) -> list[str]:
    """The keyword names a signal's doc lists after `kwargs:` (the parenthesised notes dropped)."""
    text = signal.__doc__.split("kwargs:", 1)[1]
    depth, flat = 0, []
    for ch in text:
        depth += ch == "("
        if depth == 0:
            flat.append(ch)
        depth -= ch == ")"
    return [m for part in "".join(flat).split(",") if (m := part.strip().rstrip(".").strip())]


def signal_table() -> str:
    from conch_dna.training.kd import signals

    rows = ["| signal | when | keyword arguments |", "|---|---|---|"]
    for sig in signals.ALL_SIGNALS:
        python_name = next(k for k, v in vars(signals).items() if v is sig)
        when = sig.__doc__.split("kwargs:", 1)[0]
        kwargs = ", ".join(f"`{k}`" for k in documented_kwargs(sig))
        rows.append(f"| `signals.{python_name}` (`{sig.name}`) | {_cell(when)} | {kwargs} |")
    return "\n".join(rows)


def _signature(fn) -> str:
    """`(a: int = 1, *, b: str | None = None) -> X`, annotations written as in the source (not quoted)."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for n, p in sig.parameters.items() if n not in ("self", "cls")]
    text, star = [], False
    for p, original in zip(params, [p for n, p in sig.parameters.items() if n not in ("self", "cls")]):
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            text.append("*")
        star = star or p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_POSITIONAL)
        ann = original.annotation
        part = str(p)
        if ann is not inspect.Parameter.empty:
            ann = ann if isinstance(ann, str) else inspect.formatannotation(ann)
            name, eq, default = part.partition("=")
            part = f"{name}: {ann}" + (f" = {default}" if eq else "")
        text.append(part)
    ret = sig.return_annotation
    ret = "" if ret is inspect.Signature.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return f"({', '.join(text)}){ret}"


def _public_api(cls) -> list[str]:
    rows = [f"- `{cls.__name__}{_signature(cls.__init__).removesuffix(' -> None')}`: {_cell(_first_line(cls))}"]
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            rows.append(f"  - `.{name}` (property): {_cell(_first_line(member.fget))}")
        elif inspect.isfunction(member) or isinstance(member, classmethod | staticmethod):
            fn = member.__func__ if isinstance(member, classmethod | staticmethod) else member
            rows.append(f"  - `.{name}{_signature(fn)}`: {_cell(_first_line(fn))}")
    return rows


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj)
    if not doc:
        raise SystemExit(f"{obj.__qualname__} is public and has no docstring: the reference needs one")
    return doc.split("\n\n", 1)[0]


def python_api() -> str:
    from conch_dna.cortex import AnswerStream, Cortex, NeuronRegistry, Sampling
    from conch_dna.ego import EGO
    from conch_dna.ego.experience import ExperienceStore
    from conch_dna.training.kd import TrueKnowledgeDistiller

    rows = []
    for cls in (TrueKnowledgeDistiller, NeuronRegistry, Cortex, AnswerStream, Sampling, EGO, ExperienceStore):
        rows += [f"### `{cls.__module__}.{cls.__name__}`", "", *_public_api(cls), ""]
    return "\n".join(rows).rstrip()


GENERATORS = {"cli_flags": cli_flags, "cortex_flags": cortex_flags, "config_fields": config_fields, "signals": signal_table, "python_api": python_api}


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in GENERATORS:
            raise SystemExit(f"docs/reference.md names an unknown generated block {name!r} (known: {', '.join(GENERATORS)})")
        return f"{m.group(1)}{GENERATORS[name]()}\n{m.group(4)}"

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is not what the code says")
    args = ap.parse_args(argv)
    current = REFERENCE.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("docs/reference.md is out of date: run python3 scripts/write_reference.py", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
