"""Tables that fit the terminal without cutting a number or a name.

rich squeezes a table that is wider than the console by shrinking columns below their
longest word, and then cuts words with an ellipsis (``flo…`` for ``float16``, ``5…`` for
500). Here the layout is chosen from the cells themselves, so that no cell is ever narrower
than its longest word:

1. the table as it is, boxed, when it fits at its natural width;
2. otherwise the same table with light rules (no vertical lines: 2 columns between cells
   instead of 3);
3. otherwise the same rows split into a few narrower light tables, each repeating the key
   columns (pipeline, dtype) so that every row can still be read across; cells may wrap,
   at spaces only;
4. otherwise (very narrow terminals, or a split into too many parts to read) one block per
   row: its keys as a heading, then one ``column  value`` line per cell.

Rendering only: the cells arrive as finished text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# A split into more tables than this reads worse than one block per row.
MAX_PARTS = 4
# Every line of blocks is indented this much under its heading.
BLOCK_INDENT = 2


@dataclass(frozen=True)
class Column:
    """A column: its header, how its cells are justified, and whether it identifies a row
    (key columns are repeated in every part of a split table and head every block)."""

    header: str
    justify: str = "left"
    key: bool = False
    # kept in the same part as the column before it (a "closed form" beside its value)
    follows: bool = False


@dataclass(frozen=True)
class Row:
    """The cells of one row, and whether a section line goes above it."""

    cells: Sequence[Text]
    new_section: bool = False


def _lines(text: Text) -> list[str]:
    return text.plain.split("\n")


def longest_word(text: Text | str) -> int:
    """The narrowest a cell can be without cutting a word (rich's own minimum)."""
    plain = text.plain if isinstance(text, Text) else text
    return max((Text(word).cell_len for word in plain.split()), default=0)


def natural_width(text: Text | str) -> int:
    """The width a cell takes on one line per line of its text."""
    plain = text.plain if isinstance(text, Text) else text
    return max((Text(line).cell_len for line in plain.split("\n")), default=0)


def table_overhead(columns: int, boxed: bool = True) -> int:
    """Borders and padding of a table: boxed (edges, padding 1 each side, ``pad_edge=False``)
    or light (a rule under the header, one space of padding and one of divider between
    cells)."""
    if boxed:
        return (columns + 1) + 2 * columns - 2
    return 2 * (columns - 1)


def _measure(columns: Sequence[Column], rows: Sequence[Row]) -> tuple[list[int], list[int]]:
    minimum = [longest_word(c.header) for c in columns]
    natural = [natural_width(c.header) for c in columns]
    for row in rows:
        for i, cell in enumerate(row.cells):
            minimum[i] = max(minimum[i], longest_word(cell))
            natural[i] = max(natural[i], natural_width(cell))
    return minimum, natural


# Cells up to this wide stay on one line in a split table ("format max", a number).
ONE_LINE = 24


def _snug(minimum: Sequence[int], natural: Sequence[int]) -> list[int]:
    """The width each column gets in a split table before spare room is shared out: short
    cells whole, longer ones on about two lines, never below the longest word."""
    return [high if high <= ONE_LINE else max(low, -(-high // 2))
            for low, high in zip(minimum, natural, strict=True)]


def _fit(chosen: Sequence[int], minimum: Sequence[int], natural: Sequence[int],
         width: int) -> list[int] | None:
    """Widths for these columns of a light table within ``width``: natural where possible,
    snug otherwise, never below a column's longest word; None when even that does not fit."""
    room = width - table_overhead(len(chosen), boxed=False)
    snug = _snug(minimum, natural)
    widths = [snug[i] for i in chosen]
    if sum(widths) > room:
        widths = [minimum[i] for i in chosen]
    spare = room - sum(widths)
    if spare < 0:
        return None
    # Give the spare columns to the cells that wrap, the most wrapped first.
    while spare > 0:
        wants = [natural[i] - w for i, w in zip(chosen, widths, strict=True)]
        most = max(range(len(chosen)), key=lambda k: wants[k])
        if wants[most] <= 0:
            break
        widths[most] += 1
        spare -= 1
    return widths


def fits(columns: Sequence[Column], rows: Sequence[Row], width: int, boxed: bool = True) -> bool:
    """Whether the table fits ``width`` with every cell on one line per line of its text."""
    natural = _measure(columns, rows)[1]
    return sum(natural) + table_overhead(len(columns), boxed) <= width


def plan_parts(columns: Sequence[Column], rows: Sequence[Row],
               width: int) -> list[tuple[list[int], list[int]]] | None:
    """For a table too wide for ``width``: the column indices and widths of each part, or
    None for blocks.

    The non-key columns in order, as many to a part as fit beside the keys with each cell
    on at most about two lines (wrapped at spaces: never narrower than its longest word).
    """
    minimum, natural = _measure(columns, rows)
    snug = _snug(minimum, natural)
    keys = [i for i, c in enumerate(columns) if c.key]
    groups: list[list[int]] = []  # a column with those that follow it
    for i, column in enumerate(columns):
        if column.key:
            continue
        if column.follows and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    parts: list[list[int]] = []
    current: list[int] = []
    for group in groups:
        chosen = [*keys, *current, *group]
        snug_width = sum(natural[k] if columns[k].key else snug[k] for k in chosen)
        if snug_width + table_overhead(len(chosen), boxed=False) <= width:
            current.extend(group)
            continue
        if current:
            parts.append(current)
        current = list(group)
    if current:
        parts.append(current)
    if len(parts) > MAX_PARTS:
        return None
    planned = []
    for part in parts:
        chosen = sorted([*keys, *part])
        widths = _fit(chosen, minimum, natural, width)
        if widths is None:
            return None
        planned.append((chosen, widths))
    return planned


def _table(columns: Sequence[Column], rows: Sequence[Row], chosen: Sequence[int],
           widths: Sequence[int] | None, boxed: bool = True) -> Table:
    if boxed:
        table = Table(header_style="bold", pad_edge=False)
    else:
        table = Table(header_style="bold", box=box.SIMPLE_HEAD, show_edge=False,
                      padding=(0, 1, 0, 0), pad_edge=False)
    for k, i in enumerate(chosen):
        table.add_column(columns[i].header, justify=columns[i].justify,  # type: ignore[arg-type]
                         width=None if widths is None else widths[k],
                         overflow="fold")  # never reached: widths hold every word
    for n, row in enumerate(rows):
        if row.new_section and n:
            table.add_section()
        table.add_row(*(row.cells[i] for i in chosen))
    return table


def _blocks(console: Console, columns: Sequence[Column], rows: Sequence[Row]) -> None:
    """One block per row: the keys as a heading, then ``column  value`` lines (the value
    under its label where the two do not fit side by side)."""
    width = console.width
    keys = [i for i, c in enumerate(columns) if c.key]
    others = [i for i, c in enumerate(columns) if not c.key]
    minimum, _ = _measure(columns, rows)
    label = max((natural_width(columns[i].header) for i in others), default=0)
    beside = BLOCK_INDENT + label + 2
    side_by_side = bool(others) and width - beside >= max(minimum[i] for i in others)
    for n, row in enumerate(rows):
        if n:
            console.print()
        heading = Text(" · ").join(row.cells[i] for i in keys) if keys else Text("")
        heading.stylize("bold")
        console.print(heading, soft_wrap=True)
        for i in others:
            name = Text(columns[i].header, style="dim")
            if side_by_side:
                lead, room = Text(" " * BLOCK_INDENT) + name + " " * (beside - BLOCK_INDENT
                                                                     - name.cell_len), \
                    width - beside
            else:
                console.print(Text(" " * BLOCK_INDENT) + name, soft_wrap=True)
                lead, room = Text(" " * 2 * BLOCK_INDENT), width - 2 * BLOCK_INDENT
            for k, line in enumerate(row.cells[i].wrap(console, room) or [Text("")]):
                shown = (lead if k == 0 else Text(" " * lead.cell_len)) + line
                shown.rstrip()
                console.print(shown, soft_wrap=True)


def print_table(console: Console, columns: Sequence[Column], rows: Sequence[Row]) -> None:
    """Print the rows as one table, a few narrower tables, or one block per row, whichever
    is the first to fit the console without cutting a word."""
    width = console.width
    everything = range(len(columns))
    if fits(columns, rows, width):
        console.print(_table(columns, rows, everything, None))  # the wide layout
        return
    if fits(columns, rows, width, boxed=False):
        console.print(_table(columns, rows, everything, None, boxed=False))
        return
    planned = plan_parts(columns, rows, width)
    if planned is None:
        _blocks(console, columns, rows)
        return
    for n, (chosen, widths) in enumerate(planned):
        if n:
            console.print()
        console.print(_table(columns, rows, chosen, widths, boxed=False))


def print_wrapped(console: Console, text: Text | str, indent: int = 0, hang: int | None = None,
                  style: str = "") -> None:
    """A paragraph wrapped at spaces to the console: the first line indented by ``indent``,
    the lines after it by ``hang`` (default: the same), less where a word would not fit."""
    body = text.copy() if isinstance(text, Text) else Text(text)
    if style:
        body.stylize(style)
    hang = indent if hang is None else hang
    # a word (a path, a number) longer than the indented line moves left, whole
    widest = max(0, console.width - longest_word(body))
    indent, hang = min(indent, widest), min(hang, widest)
    room = max(1, console.width - max(indent, hang))
    for n, line in enumerate(body.wrap(console, room)):
        line.rstrip()
        console.print(Text(" " * (hang if n else indent)) + line, soft_wrap=True)
