"""mkdocs hooks: every table of names in the docs is written here from the code, never by hand.

A page asks for a table with a marker on a line of its own, ``<!-- table: NAME -->``; :func:`on_page_markdown`
replaces it with the table built by ``TABLES[NAME]`` from the registry it documents:

==================  ====================================================================================
``mistakes``        :data:`attnlab.explain.mistakes.CATALOGUE` (id, what was done, the fix)
``sections``        the chapter's sections of ``attnlab explain`` (:data:`attnlab.explain.SECTIONS`)
``modern-sections`` the opt-in sections, their defaults and their options (``MODERN_DEFAULTS``, the parser)
``steps``           every step id of every section, from a run on the book's example
``modern``          :data:`attnlab.modern.MODERN`, the modern family with its plain references
``backends``        :data:`attnlab.backends.BACKENDS` and ``"auto"``
``variants``        :data:`attnlab.variants.VARIANTS`, what ``attnlab bench`` times
``cli``             every subcommand's options, from :func:`attnlab.cli.build_parser`
``cli-COMMAND``     the options of one subcommand
==================  ====================================================================================

An unknown table name fails the build. The API reference (one page per public module, ``::: module``
rendered by mkdocstrings from the docstrings) is generated here too (:func:`on_files`) and appended to the
nav (:func:`on_config`), with the guides of ``OPTIONAL_PAGES`` whose page exists; after the build, :func:`on_post_build` checks that the site's ``objects.inv`` lists
every name of each module's ``__all__``, so a new public name without a page fails ``make docs``.
"""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import inspect
import re
import zlib
from collections.abc import Callable
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

# Public modules with a page in the API reference, in reading order. OPTIONAL ones get a page when they exist.
API_MODULES = (
    "attnlab",
    "attnlab.errors",
    "attnlab.functional",
    "attnlab.masks",
    "attnlab.modules",
    "attnlab.backends",
    "attnlab.testing",
    "attnlab.cache",
    "attnlab.rope",
    "attnlab.alibi",
    "attnlab.latent",
    "attnlab.modern",
    "attnlab.variants",
    "attnlab.flash",
    "attnlab.distributed",
    "attnlab.pretrained",
    "attnlab.explain",
    "attnlab.heatmap",
    "attnlab.report",
)
OPTIONAL_API_MODULES = ("attnlab.hf", "attnlab.generate", "attnlab.notes")

# Guides that join the nav when their page exists: (nav section, title, page).
OPTIONAL_PAGES = (
    ("Learn", "Checking whole notes", "check.md"),
    ("Use", "Serving: the cache at scale", "serving.md"),
    ("Use", "Hugging Face models", "hf.md"),
    ("Use", "Distributed layouts", "distributed.md"),
    ("Reference", "Command-line errors", "cli-errors.md"),
)

_MARKER = re.compile(r"^<!-- table: ([\w-]+) -->[ \t]*$", re.MULTILINE)


# --------------------------------------------------------------------------------------------------
# Small helpers: docstring text into one markdown table cell
# --------------------------------------------------------------------------------------------------


def _inline(text: str) -> str:
    """reST inline markup of the docstrings -> markdown, on one line, safe inside a table cell."""
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: "`" + m.group(1).split(".")[-1] + "`", text)  # :class:`~a.B`
    text = text.replace("``", "`")
    text = " ".join(text.split())
    return text.replace("|", "\\|")


def _first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring (up to the first '. ' or the first blank line)."""
    if not doc:
        return ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", para)
    return para[: match.start() + 1] if match else para


def _escape(text: str) -> str:
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------


def _book_walkthrough():
    from attnlab.explain import ALL_SECTIONS, explain

    return explain(sections=list(ALL_SECTIONS))


def table_mistakes() -> str:
    from attnlab.explain import explain
    from attnlab.explain.mistakes import CATALOGUE

    walk = explain(sections=["trainable"])  # the book's example: d_k = 2, dropout p = 0.5
    rows = []
    for mistake in CATALOGUE.values():
        extra = {"earlier": "trainable.scores"}
        while True:  # a placeholder that needs a particular check (e.g. a token) is shown by its name
            try:
                name, fix = mistake.text(walk, **extra)
                break
            except KeyError as exc:
                extra[str(exc.args[0])] = str(exc.args[0])
        rows.append((f"`{mistake.id}`", _escape(name), _escape(fix)))
    return _table(("id", "what was done", "the fix (worded for the book's example: d_k = 2, p = 0.5)"), rows)


def table_sections() -> str:
    from attnlab.explain import SECTION_TITLES, SECTIONS

    walk = _book_walkthrough()
    rows = []
    for section in SECTIONS:
        steps = [s for s in walk.steps if s.section == section]
        rows.append((f"`{section}`", _escape(SECTION_TITLES[section]),
                     "; ".join(_escape(s.title) for s in steps)))
    return _table(("section", "title", "what it shows, step by step (on the book's example)"), rows)


def _section_options(section: str) -> list[str]:
    """The explain options whose help starts with 'section NAME:' (the options of that opt-in section)."""
    explain_parser = _subparsers(_parser())["explain"]
    return [f"`{a.option_strings[-1]}`" for a in explain_parser._actions
            if a.option_strings and (a.help or "").startswith(f"section {section}:")]


def table_modern_sections() -> str:
    from attnlab.explain import MODERN_SECTIONS, SECTION_TITLES
    from attnlab.explain.modern import MODERN_DEFAULTS

    rows = []
    for section in MODERN_SECTIONS:
        defaults = ", ".join(f"{k} = {v}" for k, v in MODERN_DEFAULTS.get(section, {}).items())
        options = ", ".join(["`--heads`", "`--d-out`", *_section_options(section)])
        rows.append((f"`{section}`", _escape(SECTION_TITLES[section]), options, defaults))
    return _table(("section", "what it shows", "options", "defaults"), rows)


def table_steps() -> str:
    walk = _book_walkthrough()
    rows = [(f"`{s.id}`", _escape(s.title), "(" + ", ".join(str(n) for n in s.values.shape) + ")")
            for s in walk.steps]
    return _table(("step (`--expect STEP=...`)", "title (on the book's example)", "shape"), rows)


def table_modern() -> str:
    from attnlab.modern import MODERN

    rows = []
    for v in MODERN.values():
        cls = "MultiHeadLatentAttention" if v.latent else "MultiHeadAttention"
        options = ", ".join(f"{k}={val!r}" for k, val in v.options(12).items()) or "(the defaults)"
        rows.append((f"`{v.name}`", _escape(v.summary), f"`{cls}`", f"`{options}`",
                     "yes" if v.cached else ""))
    return _table(("name", "what it is", "module", "options (12 heads)", "decodes with a cache"), rows)


def _docstring_bullets(doc: str) -> dict[str, str]:
    """'- ``"name"``: text...' bullets of a module docstring -> {name: text}."""
    out: dict[str, str] = {}
    for block in re.split(r"\n(?=- )|\n\n", doc):
        match = re.match(r'- ``"(\w+)"``:\s*(.*)', block.strip(), re.DOTALL)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def table_backends() -> str:
    from attnlab import backends

    described = _docstring_bullets(backends.__doc__ or "")
    rows = []
    for name, fn in backends.BACKENDS.items():
        text = _first_sentence(fn.__doc__) or described.get(name, "")
        rows.append((f'`"{name}"`', f"`{fn.__module__}.{fn.__qualname__}`", _inline(text)))
    rows.append(('`"auto"`', "`attnlab.backends.resolve`", _inline(described.get("auto", ""))))
    return _table(("backend", "implementation", "what it is"), rows)


def table_variants() -> str:
    from attnlab.variants import VARIANTS

    rows = [(f"`{name}`", f"`{cls.__name__}`", _inline(_first_sentence(cls.__doc__)))
            for name, cls in VARIANTS.items()]
    return _table(("name", "class", "what it is"), rows)


def _parser() -> argparse.ArgumentParser:
    from attnlab.cli import build_parser

    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_rows(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
        if action.nargs == 0:
            arg = ""
        elif action.choices is not None:
            arg = " \\| ".join(f"`{c}`" for c in action.choices)
        else:
            arg = f"`{action.metavar or action.dest.upper()}`"
            if action.nargs in ("+", "*"):
                arg += " …"
        default = action.default
        shown = "" if default in (None, argparse.SUPPRESS, False) or action.nargs == 0 else f"`{default}`"
        help_text = formatter._expand_help(action) if action.help not in (None, argparse.SUPPRESS) else ""
        rows.append((names, arg, shown, _escape(help_text)))
    return rows


def table_cli() -> str:
    parser = _parser()
    parts = ["### `attnlab`\n", _escape(parser.description or "") + "\n",
             _table(("option", "argument", "default", "meaning"), _option_rows(parser))]
    for name, sub in _subparsers(parser).items():
        parts.append(f"\n### `attnlab {name}`\n")
        if sub.description:
            parts.append(_escape(sub.description) + "\n")
        parts.append(_table(("option", "argument", "default", "meaning"), _option_rows(sub)))
    return "\n".join(parts)


def _command_table(command: str, where: str) -> str:
    subs = _subparsers(_parser())
    if command not in subs:
        raise PluginError(f"{where}: no subcommand {command!r}; known: {', '.join(subs)}")
    return _table(("option", "argument", "default", "meaning"), _option_rows(subs[command]))


TABLES: dict[str, Callable[[], str]] = {
    "mistakes": table_mistakes,
    "sections": table_sections,
    "modern-sections": table_modern_sections,
    "steps": table_steps,
    "modern": table_modern,
    "backends": table_backends,
    "variants": table_variants,
    "cli": table_cli,
}


# --------------------------------------------------------------------------------------------------
# mkdocs hooks
# --------------------------------------------------------------------------------------------------


def _exists(module: str) -> bool:
    """A real module or package (a folder without __init__.py, a namespace package, is not one yet)."""
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is not None


def _api_modules() -> list[str]:
    missing = [m for m in API_MODULES if not _exists(m)]
    if missing:
        raise PluginError(f"docs/hooks.py: API_MODULES lists modules that do not exist: {missing}")
    return list(API_MODULES) + [m for m in OPTIONAL_API_MODULES if _exists(m)]


def _api_page(module: str) -> str:
    return f"api/{module}.md"


def _nav_section(config, title: str) -> list:
    for item in config["nav"]:
        if isinstance(item, dict) and title in item:
            return item[title]
    section: list = []
    config["nav"].append({title: section})
    return section


def on_config(config, **kwargs):
    """Add to the nav the guides of OPTIONAL_PAGES that exist, and "API reference" (one page per public
    module) to the Reference section."""
    docs = Path(config["docs_dir"])
    for section, title, page in OPTIONAL_PAGES:
        if (docs / page).is_file():
            _nav_section(config, section).append({title: page})
    entries = [{f"`{m}`": _api_page(m)} for m in _api_modules()]
    _nav_section(config, "Reference").append({"API reference": entries})
    return config


def on_files(files, config, **kwargs):
    """The API pages: a title, the module's own summary, and mkdocstrings' ``::: module``."""
    for module in _api_modules():
        content = f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
        for where in _shadowed(module).values():  # a function named like a submodule of its package
            content += f"\n::: {where}\n    options:\n      show_root_full_path: false\n"
        files.append(File.generated(config, _api_page(module), content=content))
    return files


def _shadowed(module: str) -> dict[str, str]:
    """Names of ``__all__`` that are also a submodule's name (``attnlab.explain.check``, the function, and
    ``attnlab/explain/check.py``): mkdocstrings sees the submodule, so the object gets its own entry under
    its defining path. {name: defining path}."""
    mod = importlib.import_module(module)
    out = {}
    for name in getattr(mod, "__all__", []):
        obj = getattr(mod, name, None)
        if obj is not None and not inspect.ismodule(obj) and hasattr(mod, "__path__") \
                and _exists(f"{module}.{name}") and hasattr(obj, "__qualname__"):
            out[name] = f"{obj.__module__}.{obj.__qualname__}"
    return out


def on_page_markdown(markdown, page, config, files, **kwargs):
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name.startswith("cli-"):
            return _command_table(name[len("cli-"):], page.file.src_uri)
        if name not in TABLES:
            raise PluginError(f"{page.file.src_uri}: unknown table {name!r}; known: {', '.join(TABLES)}")
        return TABLES[name]()

    return _MARKER.sub(replace, markdown)


def _inventory_names(path: Path) -> set[str]:
    """The object names of a Sphinx objects.inv (version 2: four text lines, then zlib)."""
    data = path.read_bytes()
    lines = data.split(b"\n", 4)
    body = zlib.decompress(lines[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line}


def on_post_build(config, **kwargs):
    """Every name of every API module's __all__ must be in the reference (objects.inv)."""
    names = _inventory_names(Path(config["site_dir"]) / "objects.inv")
    missing = []
    for module in _api_modules():
        public = getattr(importlib.import_module(module), "__all__", [])
        shadowed = _shadowed(module)
        missing += [f"{module}.{n}" for n in public
                    if f"{module}.{n}" not in names and shadowed.get(n) not in names]
    if missing:
        raise PluginError(f"the API reference lacks {len(missing)} public names: {', '.join(missing)}")
