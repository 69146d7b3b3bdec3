"""The domains a neuron is distilled for: their prompts and held-out prompts (a TOML file), and prompt files.

The domains file in use is `CONCH_KD_DOMAINS_FILE`, else `config/domains.toml` of the working directory, else
the package's own. Every file is read through `inputs.read_input` (a regular file of bounded size).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from conch_dna.defaults import default_file
from conch_dna.inputs import MB, read_input
from conch_dna.neuron import DataError

# Inputs larger than these are no prompt list a person wrote (`inputs.read_input` refuses them unread).
PROMPTS_MAX_BYTES, DOMAINS_MAX_BYTES = 64 * MB, 16 * MB


def domains_file() -> Path:
    """The domains file in use: `CONCH_KD_DOMAINS_FILE`, else `config/domains.toml` of the working directory,
    else the package's own (`conch_dna/defaults/domains.toml`)."""
    if env := os.environ.get("CONCH_KD_DOMAINS_FILE"):
        return Path(env)
    local = Path("config/domains.toml")
    return local if local.is_file() else default_file("domains.toml")


def load_domains(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{domain: prompts} from a domains TOML file (tables with a `prompts` list)."""
    path = Path(path) if path else domains_file()
    try:
        data = tomllib.loads(read_input(path, "domains file", DOMAINS_MAX_BYTES, DataError).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"domains file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"domains file {path} is not valid TOML: {e}") from e
    domains = {}
    for name, table in data.items():
        prompts = table.get("prompts") if isinstance(table, dict) else None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts) or not prompts:
            raise DataError(f"domain [{name}] in {path} needs a non-empty `prompts` list of non-empty strings")
        domains[name] = [p.strip() for p in prompts]
    return domains


def load_held_out(domain: str, path: str | os.PathLike | None = None) -> list[str]:
    """The domain's `held_out` prompts (never trained on; they judge the neuron's own answers), or []."""
    path = Path(path) if path else domains_file()
    table = tomllib.loads(read_input(path, "domains file", DOMAINS_MAX_BYTES, DataError).decode("utf-8")).get(domain)
    held = table.get("held_out", []) if isinstance(table, dict) else []
    if not isinstance(held, list) or not all(isinstance(p, str) and p.strip() for p in held):
        raise DataError(f"domain [{domain}] in {path}: `held_out` must be a list of non-empty strings")
    trained = set(load_domains(path).get(domain, []))
    if leaked := [p for p in held if p.strip() in trained]:
        raise DataError(f"domain [{domain}] in {path}: held-out prompt {leaked[0]!r} is also a training prompt")
    return [p.strip() for p in held]


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: JSONL (objects with "prompt", or JSON strings) or plain text, one per line.

    JSONL when the suffix is .jsonl/.json, or when every line parses as JSON; otherwise each line is a prompt
    (so a plain prompt that happens to start with a quote stays a prompt)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"prompt file {path} is a folder; give a file with one prompt per line (or JSONL)")
    raw = read_input(path, "prompt file", PROMPTS_MAX_BYTES, DataError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"prompt file {path} has no prompts; write one prompt per line (or JSONL with a \"prompt\" field)")
    by_suffix = path.suffix in (".jsonl", ".json")
    parsed = []
    for i, ln in enumerate(lines, 1):
        try:
            parsed.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if by_suffix:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); a {path.suffix} file is read as JSONL, one "
                                "JSON object per line (rename it .txt for one plain prompt per line)") from e
            return [ln.strip() for ln in lines]  # not every line is JSON: plain text
    prompts = []
    for i, obj in enumerate(parsed, 1):
        p = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{path}:{i}: read as JSONL (every line is JSON), but this line is not a non-empty string "
                            "or an object with a \"prompt\" string")
        prompts.append(p.strip())
    return prompts


def gather_prompts(sources: list[str], domains: dict[str, list[str]] | None = None) -> list[str]:
    """The prompts of `sources`, in order: a domain's name gives its training prompts (never its held-out
    ones), `all` every domain's, anything else is a prompt file (`load_prompts`)."""
    domains = load_domains() if domains is None else domains
    prompts = []
    for source in sources:
        if source == "all":
            prompts += [p for ps in domains.values() for p in ps]
        else:
            prompts += domains[source] if source in domains else load_prompts(source)
    return prompts
