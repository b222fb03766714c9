"""``attnlab explain``: argument parsing only; the walkthrough is :func:`attnlab.explain.explain`.

For reuse by other subcommands (``heatmap``, ``report``): :func:`add_input_arguments` adds the input
options, :func:`walkthrough_from_args` turns them into a :class:`~attnlab.explain.Walkthrough` and
:func:`attention_maps_from_args` loads ``--model``'s attention maps, raising :class:`~attnlab.cli.UsageError`
with a one-line message for bad input (a library error about the input, or a file the user named that cannot
be read); any other exception is left to :func:`attnlab.cli.main`, which reports it as an internal error.

A pretrained model instead of the toy input: ``add_input_arguments(parser, model=True)`` (or
:func:`add_model_arguments`) adds ``--model``, ``--text``, ``--layer`` and ``--head`` (1-based); with
``--model`` :func:`walkthrough_from_args` returns :func:`attnlab.explain.model.explain_model`'s walkthrough
of one head (a :class:`~attnlab.explain.model.ModelWalkthrough`, section ``model``).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from attnlab.cli import UsageError, first_line
from attnlab.cli.options import INSTALL_HINT, missing_model_package  # one install hint for every command
from attnlab.errors import AttnlabInputError
from attnlab.explain import MODERN_SECTIONS, SECTIONS, Walkthrough, explain, resolve_sections
from attnlab.explain.check import check, format_results, parse_expect
from attnlab.explain.inputs import invisible_only, load_embeddings, load_weights

__all__ = ["INSTALL_HINT", "add_input_arguments", "add_model_arguments", "attention_maps_from_args",
           "check_model_options", "register", "report_warnings", "run", "walkthrough_from_args"]

_T = TypeVar("_T")

# Messages from the library name its arguments; on the command line they are options.
_OPTION_NAMES = {"tokens": "--tokens", "embeddings": "--embeddings", "dim": "--dim", "query": "--query",
                 "weights": "--weights", "d_out": "--d-out", "heads": "--heads", "dropout": "--dropout",
                 "seed": "--seed", "sections": "--section", "unknown section": "--section: unknown section",
                 "model": "--model", "text": "--text", "layer": "--layer", "head": "--head",
                 "kv_groups": "--kv-groups", "window_size": "--window-size", "rope_base": "--rope-base",
                 "rope_shift": "--rope-shift"}
_LEADING_NAME = re.compile(
    r"^(unknown section|tokens|embeddings|dim|query|weights|d_out|heads|dropout|seed|sections"
    r"|model|text|layer|head|kv_groups|window_size|rope_base|rope_shift)\b"
)
# Toy-input options and their defaults: with --model, giving any of them is a mistake.
_TOY_OPTIONS = (("tokens", "--tokens", None), ("embeddings", "--embeddings", None), ("dim", "--dim", None),
                ("weights", "--weights", None), ("scale", "--no-scale", True), ("d_out", "--d-out", None),
                ("heads", "--heads", None), ("dropout", "--dropout", 0.5), ("seed", "--seed", 123),
                ("section", "--section", None), ("kv_groups", "--kv-groups", None),
                ("window_size", "--window-size", None), ("rope_base", "--rope-base", 10000.0),
                ("rope_shift", "--rope-shift", None))


def _one_line(exc: BaseException) -> str:
    """The first line of a library error, its leading argument name spelled as the option (``query`` ->
    ``--query``)."""
    return _LEADING_NAME.sub(lambda m: _OPTION_NAMES[m.group(1)], first_line(exc))


def _read_user_file(load: Callable[[str], _T], spec: str) -> _T:
    """``load(spec)`` of a file the user named (``--embeddings``, ``--weights``): a file that cannot be read is
    the user's to fix (the loader's message names the option and the path), so it becomes a UsageError."""
    try:
        return load(spec)
    except OSError as exc:
        raise UsageError(_one_line(exc)) from None


def _load_model(args: argparse.Namespace, load: Callable[[], _T], toy_only: tuple[tuple[str, str, Any], ...] = (),
                ) -> tuple[_T, list[warnings.WarningMessage]]:
    """``load()`` of ``--model`` on ``--text`` after :func:`check_model_options`, its warnings recorded.
    UsageError (one line) for what is the user's: bad input (the library's AttnlabInputError, its argument
    names spelled as options), a missing optional package, and a model that cannot be read (``--model DIR``:
    a file missing or unreadable; a name whose files are neither cached nor reachable)."""
    check_model_options(args, toy_only)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load()
    except ImportError as exc:
        raise missing_model_package(exc) from None
    except AttnlabInputError as exc:
        raise UsageError(_one_line(exc)) from None
    except OSError as exc:  # reading the model's files: the directory or name the user gave
        raise UsageError(f"--model {args.model}: cannot load it: {first_line(exc)}") from None
    return loaded, caught


def add_input_arguments(parser: argparse.ArgumentParser, *, model: bool = False) -> None:
    """The input options shared by explain, heatmap and report; with ``model=True`` also the pretrained
    model's (:func:`add_model_arguments`)."""
    g = parser.add_argument_group("input (default: the book's \"Your journey starts with one step\")")
    g.add_argument("--tokens", metavar="TEXT", help='whitespace-separated tokens, e.g. "The cat ran"')
    g.add_argument("--embeddings", metavar="JSON|FILE",
                   help="one row per token: inline JSON '[[0.2,0.1,0.5], ...]' or a .json, .csv or .npy file "
                        "(default with --tokens: seeded random ones of --dim numbers)")
    g.add_argument("--dim", type=int, default=None, metavar="N",
                   help="with --tokens and no --embeddings: size of the random embeddings (default 3)")
    g.add_argument("--query", metavar="TOKEN|POSITION",
                   help="the query token, or its 1-based position (default: the second token, as the book)")
    g.add_argument("--weights", metavar="FILE.json",
                   help="W_query, W_key, W_value, each d_in x d_out (x @ W); used in every section "
                        "instead of the seeded ones")
    g.add_argument("--no-scale", dest="scale", action="store_false",
                   help="do not divide scores by sqrt(d_k) in the trainable and causal steps")
    g.add_argument("--d-out", dest="d_out", type=int, default=None, metavar="N",
                   help="size of queries, keys and values (default 2, or the weights' width)")
    g.add_argument("--heads", type=int, default=None, metavar="N",
                   help="heads for multi-head attention (default 2, or a count that divides d_out, said in the "
                        "output)")
    g.add_argument("--dropout", type=float, default=0.5, metavar="P",
                   help="dropout rate of the dropout step (default 0.5)")
    g.add_argument("--seed", type=int, default=123, metavar="N",
                   help="seed of weights, dropout and random embeddings (default 123, the book's; "
                        "SelfAttention_v2 uses seed + 666 = 789)")
    m = parser.add_argument_group(f"the opt-in sections {', '.join(MODERN_SECTIONS)} (--section cache gqa window "
                                  "rope; --heads and --d-out apply to them too)")
    m.add_argument("--kv-groups", dest="kv_groups", type=int, default=None, metavar="N",
                   help="section gqa: key/value heads shared by the query heads (default 2 of 4 heads; 1 = "
                        "multi-query)")
    m.add_argument("--window-size", dest="window_size", type=int, default=None, metavar="N",
                   help="section window: keys each query sees, itself included (default 3)")
    m.add_argument("--rope-base", dest="rope_base", type=float, default=10000.0, metavar="B",
                   help="section rope: base of the rotation angles (default 10000, Llama's)")
    m.add_argument("--rope-shift", dest="rope_shift", type=int, default=None, metavar="N",
                   help="section rope: positions added to show the scores do not change (default 10)")
    if model:
        add_model_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--text``, ``--layer``, ``--head``: one head of a pretrained model (MiniLM or a local
    Hugging Face model directory) instead of the toy input (``--query`` picks the query token in both)."""
    from attnlab.cli.options import add_model_arguments as add_shared

    add_shared(parser, what="walk through one head of the model on --text",
               layer_help="the layer, 1-based (1..6 for minilm; default the last)",
               head_help="with --model: the head, 1-based (1..12 for minilm; default 1)")
    parser.set_defaults(_model_options=True)


def _sections(values: list[str] | None, command: str = "explain") -> tuple[str, ...] | None:
    """``--section`` values (space- or comma-separated, old names accepted with a notice on stderr)."""
    if not values:
        return None
    chosen, notices = resolve_sections(values)
    for notice in notices:
        sys.stderr.write(f"attnlab {command}: note: {notice}\n")
    return chosen


def check_model_options(args: argparse.Namespace, toy_only: tuple[tuple[str, str, object], ...] = ()) -> None:
    """With ``--model``: ``--text`` is required and the toy-input options (``_TOY_OPTIONS``, plus a
    command's own ``toy_only`` as (dest, flag, default)) are refused, in one line."""
    if args.model is None or args.text is None:
        raise UsageError('--model and --text go together, e.g. --model minilm --text "The cat sat."')
    if invisible_only(args.text):
        what = "empty" if not args.text.strip() else "made only of invisible characters (zero-width spaces, ...)"
        raise UsageError(f'--text is {what}: the model would see only [CLS] [SEP]; give a sentence, e.g. '
                         '--text "The cat sat."')
    toy = [flag for dest, flag, default in (*_TOY_OPTIONS, *toy_only)
           if getattr(args, dest, default) != default and getattr(args, dest, default) != []]
    if toy:
        raise UsageError(f"--model takes its input from --text; {', '.join(toy)} "
                         f"{'applies' if len(toy) == 1 else 'apply'} to the toy example only")


def report_warnings(args: argparse.Namespace, caught: list[warnings.WarningMessage]) -> None:
    """Each recorded UserWarning (e.g. a text cut at the model's limit) as one stderr line."""
    command = getattr(args, "command", None) or "explain"
    for w in caught:
        if issubclass(w.category, UserWarning):
            sys.stderr.write(f"attnlab {command}: warning: {str(w.message).splitlines()[0]}\n")


def _model_walkthrough(args: argparse.Namespace) -> Walkthrough:
    """The walkthrough of one head of ``--model`` on ``--text``; the long-text warning as one stderr line."""

    def load() -> Walkthrough:
        from attnlab.explain.model import explain_model

        return explain_model(args.text, model=args.model, layer=args.layer,
                             head=1 if args.head is None else args.head, query=args.query)

    walk, caught = _load_model(args, load)
    report_warnings(args, caught)
    return walk


def attention_maps_from_args(args: argparse.Namespace, toy_only: tuple[tuple[str, str, Any], ...] = ()) -> Any:
    """:func:`attnlab.explain.model.attention_maps` of ``--model`` on ``--text``: every layer's and head's
    weights (an :class:`attnlab.pretrained.AttentionMaps`). UsageError (one line) for bad input, a missing
    optional package, or a toy-input option given too (``attnlab explain``'s, plus ``toy_only`` as (dest,
    flag, default)), checked before loading. A text cut at the model's token limit: one
    ``attnlab COMMAND: warning: ...`` line on stderr."""

    def load() -> Any:
        from attnlab.explain.model import attention_maps

        return attention_maps(args.text, model=args.model)

    maps, caught = _load_model(args, load, toy_only)
    report_warnings(args, caught)
    return maps


def walkthrough_from_args(args: argparse.Namespace) -> Walkthrough:
    """Build the walkthrough from parsed options; UsageError (one line) for any bad input.

    With ``--model`` (:func:`add_model_arguments`): the pretrained model's walkthrough of one head."""
    if getattr(args, "_model_options", False):
        if args.model is not None or args.text is not None:
            return _model_walkthrough(args)
        given = [flag for flag, value in (("--layer", args.layer), ("--head", args.head))
                 if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(f"{' and '.join(given)} {verb} to a pretrained model only, e.g. --model minilm "
                             '--text "The cat sat."')
    try:
        sections = _sections(getattr(args, "section", None), getattr(args, "command", None) or "explain")
        embeddings = _read_user_file(load_embeddings, args.embeddings) if args.embeddings is not None else None
        weights = _read_user_file(load_weights, args.weights) if args.weights is not None else None
        if args.tokens is not None and not args.tokens.strip():
            raise AttnlabInputError("--tokens is empty: give at least one token, e.g. --tokens \"The cat ran\"")
        if args.dim is not None and (args.tokens is None or args.embeddings is not None):
            raise UsageError("--dim sets the width of the random embeddings drawn for --tokens, so "
                             + ("with --embeddings it changes nothing: leave out --dim" if args.embeddings is not None
                                else 'without --tokens it changes nothing (the book\'s embeddings are 3 wide): add '
                                     '--tokens "The cat ran", or leave out --dim'))
        walk = explain(
            args.tokens, embeddings, query=args.query, weights=weights, d_out=args.d_out, heads=args.heads,
            dropout=args.dropout, seed=args.seed, scale=args.scale, dim=args.dim,
            sections=sections, kv_groups=getattr(args, "kv_groups", None),
            window_size=getattr(args, "window_size", None), rope_base=getattr(args, "rope_base", 10000.0),
            rope_shift=getattr(args, "rope_shift", None),  # absent on a parser built without them: defaults
        )
    except AttnlabInputError as exc:
        raise UsageError(_one_line(exc)) from None
    rope = walk.settings.modern.get("rope") if walk.settings.modern else None
    base = getattr(args, "rope_base", 10000.0)
    if rope is not None and rope["head_dim"] == 2 and base != 10000.0:
        sys.stderr.write(f"attnlab {getattr(args, 'command', None) or 'explain'}: note: --rope-base {base:g} changes "
                         "nothing with head size 2 (one feature pair, turned by θ_1 = 1 for every base); add "
                         "--d-out 4 to see it\n")
    return walk


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.precision <= 10:
        raise UsageError(f"--precision must be in 0..10, got {args.precision}")
    walk = walkthrough_from_args(args)
    expectations = []
    for text in args.expect or []:
        step_id = text.partition("=")[0].strip()
        reason = walk.absent_reason(step_id) if "=" in text else None
        if reason:
            raise UsageError(f"--expect {reason}")
        try:
            expectations.append(parse_expect(text, walk.step_ids))
        except AttnlabInputError as exc:
            raise UsageError(_one_line(exc)) from None
    try:
        results = check(walk, expectations, precision=args.precision)
    except AttnlabInputError as exc:
        raise UsageError(_one_line(exc)) from None
    verdicts = format_results(results, precision=args.precision)
    if args.format == "json":
        from attnlab.explain.render_json import to_json

        sys.stdout.write(to_json(walk, checks=results if expectations else None) + "\n")
    elif args.format == "markdown":
        from attnlab.explain.render_markdown import to_markdown

        sys.stdout.write(to_markdown(walk, precision=args.precision, checks=verdicts))
    else:
        from attnlab.explain.render_text import render_text

        render_text(walk, precision=args.precision, checks=verdicts)
    return 0 if all(r.ok for r in results) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="chapter 3 computed step by step on the book's sentence or your own tokens, embeddings, weights",
        description="Walk through chapter 3's attention, every intermediate labelled with its tokens, and "
                    "check your own hand calculation with --expect (exit 0 when it matches, 1 when not). "
                    "With --model minilm|DIR --text TEXT: one head of a real pretrained model (MiniLM or a local Hugging Face model directory), step by step.",
    )
    add_input_arguments(parser, model=True)
    out = parser.add_argument_group("output")
    out.add_argument("--section", nargs="+", metavar="NAME",
                     help=f"only these sections: {', '.join(SECTIONS)} (default all of these; the old name "
                          "'simplified' is accepted with a notice: simple and all), and the opt-in ones "
                          f"{', '.join(MODERN_SECTIONS)} (modern LLMs' attention: KV cache, grouped-query, "
                          "sliding window, RoPE), recorded only when named")
    out.add_argument("--precision", type=int, default=4, metavar="N", help="decimals shown (default 4)")
    out.add_argument("--format", choices=("text", "markdown", "json"), default="text",
                     help="text (colour in a terminal), markdown, or json (documented in docs/explain.md)")
    out.add_argument("--expect", action="append", metavar="STEP=VALUES",
                     help="check your numbers for the query, e.g. trainable.scores=4,5,3 "
                          "(rows separated by ';'); repeatable")
    parser.set_defaults(func=run)
