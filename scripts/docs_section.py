"""Rewrite one marked section of a markdown file with a benchmark's fresh output: the text between
`<!-- name -->` and `<!-- /name -->`. Used by the bench scripts' --docs option."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def update_section(relative, name, text):
    path = ROOT / relative
    content = path.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in content or end not in content:
        raise SystemExit(f"{relative} has no section marked {start} ... {end}")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text.strip()}\n{end}{tail}")
    print(f"rewrote the {name} section of {relative}")
