"""Pictures of the physical block pool: which block holds which sequence's
tokens, how full it is, and which blocks are shared (reference count > 1).

`snapshot_pool` reads the real allocator and block tables; `render_text` draws
a snapshot as text (for the demo and the notebook); `draw_block_pool` draws
one or more snapshots as a PNG with matplotlib (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from paged_attention.core.block_allocator import BlockAllocator
from paged_attention.core.block_table import BlockTable

OTHER = "(other)"


@dataclass(frozen=True)
class BlockState:
    owners: tuple[str, ...]  # sequence ids whose tables hold the block
    num_filled: int  # token slots in use (the most any owner has written)
    ref_count: int


@dataclass
class PoolSnapshot:
    num_blocks: int
    block_size: int
    used: dict[int, BlockState] = field(default_factory=dict)  # block id -> state
    title: str = ""

    @property
    def num_used(self) -> int:
        return len(self.used)

    @property
    def num_shared(self) -> int:
        return sum(1 for s in self.used.values() if s.ref_count > 1)

    @property
    def sequences(self) -> list[str]:
        seen: dict[str, None] = {}
        for state in self.used.values():
            for owner in state.owners:
                seen.setdefault(owner, None)
        return list(seen)


def snapshot_tables(
    allocator: BlockAllocator, tables: Iterable[tuple[str, BlockTable]], title: str = ""
) -> PoolSnapshot:
    """The pool as these (sequence id, block table) pairs and the allocator see
    it. Blocks the allocator has handed out that none of the tables holds (a
    prefix cache's, or a table not passed in) appear with owner "(other)"."""
    owners: dict[int, list[str]] = {}
    filled: dict[int, int] = {}
    bs = allocator.block_size
    for seq_id, table in tables:
        for i, block_id in enumerate(table.block_ids):
            owners.setdefault(block_id, []).append(seq_id)
            n = min(bs, max(table.num_tokens - i * bs, 0))
            filled[block_id] = max(filled.get(block_id, 0), n)
    free = set(allocator.free_block_ids())
    for block_id in range(allocator.num_blocks):
        if block_id not in free and block_id not in owners:
            owners[block_id] = [OTHER]
            filled[block_id] = bs
    used = {b: BlockState(tuple(owners[b]), filled[b], allocator.ref_count(b)) for b in sorted(owners)}
    return PoolSnapshot(allocator.num_blocks, bs, used, title)


def snapshot_pool(engine, title: str = "") -> PoolSnapshot:
    """The running requests' blocks in an `LLMEngine`, read between steps
    (waiting requests hold no device blocks)."""
    tables = [(r.request_id, r.block_table) for r in engine.scheduler.running]
    return snapshot_tables(engine.allocator, tables, title)


# ------------------------------------------------------------------ text
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def render_text(snapshot: PoolSnapshot, width: int = 16, max_blocks: int | None = None) -> str:
    """One cell per physical block: the owner's letter and how full the block is
    in eighths ('A8' full, 'A3' three eighths), '*' for a shared block (ref
    count > 1, listed below), '..' for a free one.

        A8 A8 A3 B8 *8 .. ..
    """
    letter = {seq: _LETTERS[i % len(_LETTERS)] for i, seq in enumerate(snapshot.sequences)}
    n = snapshot.num_blocks if max_blocks is None else min(max_blocks, snapshot.num_blocks)
    cells = []
    for b in range(n):
        state = snapshot.used.get(b)
        if state is None:
            cells.append("..")
            continue
        mark = "*" if state.ref_count > 1 else letter[state.owners[0]]
        cells.append(f"{mark}{math.ceil(8 * state.num_filled / snapshot.block_size)}")
    lines = [" ".join(cells[i : i + width]) for i in range(0, len(cells), width)]
    header = (
        f"{snapshot.title + ': ' if snapshot.title else ''}{snapshot.num_used}/{snapshot.num_blocks} "
        f"blocks used, {snapshot.num_shared} shared, block size {snapshot.block_size}"
    )
    if n < snapshot.num_blocks:
        lines.append(f"... {snapshot.num_blocks - n} more blocks")
    if snapshot.sequences:
        lines.append("sequences: " + ", ".join(f"{letter[s]}={s}" for s in snapshot.sequences))
    for b, state in snapshot.used.items():
        if state.ref_count > 1:
            owners = ", ".join(letter[o] for o in state.owners)
            lines.append(f"shared: block {b} (ref count {state.ref_count}: {owners})")
    return header + "\n" + "\n".join(lines)


# ------------------------------------------------------------------ PNG
def draw_block_pool(snapshots: Sequence[PoolSnapshot], path: str | Path, max_blocks: int = 1024) -> Path:
    """Draw each snapshot as a grid of blocks: colour = owning sequence, shade =
    how full the block is, hatched black edge = shared (ref count > 1), grey =
    free. Pools larger than `max_blocks` show their first `max_blocks` blocks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    palette = [
        to_rgba(c)
        for c in (
            "tab:blue",
            "tab:orange",
            "tab:green",
            "tab:red",
            "tab:purple",
            "tab:brown",
            "tab:pink",
            "tab:olive",
            "tab:cyan",
            "navy",
            "darkgoldenrod",
            "teal",
        )
    ]
    fig = Figure(figsize=(10, 3.2 * len(snapshots)), constrained_layout=True)
    FigureCanvasAgg(fig)
    for k, snap in enumerate(snapshots):
        ax = fig.add_subplot(len(snapshots), 1, k + 1)
        n = min(snap.num_blocks, max_blocks)
        cols = max(8, math.ceil(math.sqrt(n * 4)))
        rows = math.ceil(n / cols)
        colour = {seq: palette[i % len(palette)] for i, seq in enumerate(snap.sequences)}
        for b in range(n):
            r, c = divmod(b, cols)
            y = rows - 1 - r
            state = snap.used.get(b)
            if state is None:
                ax.add_patch(Rectangle((c, y), 0.92, 0.92, facecolor="0.9", edgecolor="none"))
                continue
            base = colour[state.owners[0]]
            fill = state.num_filled / snap.block_size
            # Unused slots of a used block: the internal fragmentation, drawn pale.
            ax.add_patch(Rectangle((c, y), 0.92, 0.92, facecolor=(*base[:3], 0.25), edgecolor="none"))
            ax.add_patch(Rectangle((c, y), 0.92 * fill, 0.92, facecolor=base, edgecolor="none"))
            if state.ref_count > 1:
                ax.add_patch(
                    Rectangle((c, y), 0.92, 0.92, fill=False, hatch="///", edgecolor="black", linewidth=1.2)
                )
        ax.set_xlim(0, cols)
        ax.set_ylim(0, rows)
        ax.set_aspect("equal")
        ax.axis("off")
        shown = f" (first {n} of {snap.num_blocks})" if n < snap.num_blocks else ""
        ax.set_title(
            f"{snap.title}{': ' if snap.title else ''}{snap.num_used}/{snap.num_blocks} blocks used{shown}, "
            f"{len(snap.sequences)} sequences, {snap.num_shared} shared blocks (hatched); "
            f"block size {snap.block_size}, pale = unused slots",
            fontsize=9,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
