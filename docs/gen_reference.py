"""Write one API reference page per module of flowdiff (run by mkdocs-gen-files at build time).

A new module under flowdiff/ gets its page and its place in the navigation with no edit here:
``docs/reference/<module path>.md`` holds ``::: flowdiff.<module>`` and ``reference/SUMMARY.md``
lists them all for mkdocs-literate-nav.
"""

from pathlib import Path

import mkdocs_gen_files

PACKAGE = Path(__file__).parent.parent / "flowdiff"

nav = mkdocs_gen_files.Nav()
for source in sorted(PACKAGE.rglob("*.py")):
    module = source.relative_to(PACKAGE.parent).with_suffix("")
    parts = tuple(module.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        page = Path(*parts, "index.md")
    elif parts[-1] == "__main__" or parts[-1].startswith("_"):
        continue
    else:
        page = Path(*parts).with_suffix(".md")
    nav[parts] = page.as_posix()
    with mkdocs_gen_files.open(Path("reference", page), "w") as file:
        file.write(f"# `{'.'.join(parts)}`\n\n::: {'.'.join(parts)}\n")
    mkdocs_gen_files.set_edit_path(Path("reference", page), source.relative_to(PACKAGE.parent))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as file:
    file.writelines(nav.build_literate_nav())
