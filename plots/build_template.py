"""Build plots/template.html: the page `dvc plots show|diff` fills, with Vega, Vega-Lite and
Vega-Embed inlined so the plots render offline (DVC's default page loads them from a CDN).

    cd "$(mktemp -d)" && npm pack vega@5 vega-lite@5 vega-embed@6 && for f in *.tgz; do tar xzf "$f" --one-top-level; done
    python plots/build_template.py THAT_DIR

The template has no {scripts} placeholder, so DVC's CDN <script> tags are never added; .dvc/config
points `plots.html_template` here. `imagegen report` reuses the same libraries.
"""

from __future__ import annotations

import sys
from pathlib import Path

LIBS = (("vega", "vega.min.js"), ("vega-lite", "vega-lite.min.js"), ("vega-embed", "vega-embed.min.js"))
OUT = Path(__file__).with_name("template.html")
HEAD = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<style>body { font-family: sans-serif; margin: 16px } table { border-spacing: 15px }</style>
"""
TAIL = """</head>
<body>
{plot_divs}
</body>
</html>
"""


def main(folder: str) -> None:
    parts = [HEAD]
    for name, build in LIBS:
        found = sorted(Path(folder).glob(f"{name}-[0-9]*/package/build/{build}"))
        if not found:
            sys.exit(f"{folder}: no {name}-<version>/package/build/{build}; run `npm pack {name}` there and unpack it")
        path = found[-1]
        version = path.parents[2].name.removeprefix(f"{name}-")
        code = path.read_text(encoding="utf8")
        if "</script" in code or "{plot_divs}" in code or "{refresh_tag}" in code:
            sys.exit(f"{path}: contains a sequence that cannot be inlined")
        parts.append(f"<!-- {name} {version} (BSD-3-Clause, https://github.com/vega/{name}) -->\n"
                     f"<script>\n{code.strip()}\n</script>\n")
    parts.append(TAIL)
    OUT.write_text("".join(parts), encoding="utf8")
    print(f"{OUT}: {OUT.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
