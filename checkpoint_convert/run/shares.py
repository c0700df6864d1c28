"""Which process writes which output files when one conversion is split across processes (see ``distributed``).

The unit of work is an output file: a Megatron rank file, a Hugging Face shard; for ``torch_dist``, where
every process streams into a data file of its own, one chunk (an item's tensor). A process reads the source
items its files need: an item feeding files of several processes is read by each of them.

A process's cost is taken as the bytes it writes plus the source bytes it reads (each item once per
process). Files are assigned largest first, each to the process whose cost grows least (reads it already
makes are free): the longest-processing-time rule, with shared reads. This is done twice: keeping each
group of files that read the same source tensors together (the TP x EP rank files of one pipeline rank),
and file by file; the assignment whose busiest process costs less wins, whole groups on a tie. So TP2 PP4 on
four processes gives each a pipeline rank, and TP8 PP1 on four gives each two rank files, every process
then reading the whole source. The split depends on the plan alone: every process computes the same one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

from ..formats.hf_io import shard_split, tensor_nbytes
from ..formats.megatron_io import rank_file_of
from .plan import Plan


@dataclass(frozen=True)
class _Work:
    """Files assigned together: the bytes they hold and the items (by index in the plan) they read."""

    files: tuple[Hashable, ...]
    nbytes: int
    items: frozenset[int]


@dataclass(frozen=True)
class Split:
    """One conversion's outputs divided among ``processes`` processes."""

    processes: int
    entry_owner: tuple[int, ...]  # the process writing each planned output (``plan.by_item`` order)
    item_readers: tuple[frozenset[int], ...]  # the processes reading each item (``plan.items`` order)
    owner: dict[Hashable, int]  # output file -> its process
    written: tuple[int, ...]  # bytes each process writes
    read: tuple[int, ...]  # source bytes each process reads
    duplicated: int  # source bytes read again by a second (third, ...) process

    def files(self, process: int) -> frozenset[Hashable]:
        return frozenset(file for file, owner in self.owner.items() if owner == process)

    def summary(self) -> str:
        """One line: bytes written per process, and the source read more than once."""
        written = " + ".join(f"{count / 1e9:.2f}" for count in self.written)
        return (f"{self.processes} processes wrote {written} GB; {self.duplicated / 1e9:.2f} GB of the source was "
                "read by more than one")


def output_files(plan: Plan) -> list[tuple[Hashable, Hashable]]:
    """(file, group) of every planned output, in ``plan.by_item`` order; a group's files read the same items."""
    keys = [entry[1] for entry in plan.by_item]
    if plan.to_hf:
        file_of = shard_split(plan.planned, plan.options.max_shard_size,
                              plan.options.safe_serialization).tensor_to_filename
        return [(file_of[key], file_of[key]) for key in keys]
    if plan.ckpt_format == "torch_dist":
        return [(index, index) for index in range(len(keys))]
    files = [rank_file_of(key[0], plan.layout.pp) for key in keys]
    return [(file, file.pp) for file in files]


def source_bytes(plan: Plan) -> list[int]:
    """The bytes of every item's full source tensor (``plan.items`` order), read from shapes alone."""
    return [plan.source.tensors.full(item, meta=True).nbytes for item in plan.items]


def split_outputs(plan: Plan, processes: int) -> Split:
    """The split of ``plan``'s output files among ``processes`` processes (see the module's docstring)."""
    index_of = {id(item): index for index, item in enumerate(plan.items)}
    read = source_bytes(plan)
    files = output_files(plan)
    by_file: dict[Hashable, list] = {}
    group_of: dict[Hashable, Hashable] = {}
    for (item, _, shape, dtype), (file, group) in zip(plan.by_item, files):
        work = by_file.setdefault(file, [0, set()])
        work[0] += tensor_nbytes(shape, dtype)
        work[1].add(index_of[id(item)])
        group_of[file] = group
    singles = [_Work((file,), nbytes, frozenset(items)) for file, (nbytes, items) in by_file.items()]
    grouped: dict[Hashable, list[_Work]] = {}
    for work in singles:
        grouped.setdefault(group_of[work.files[0]], []).append(work)
    wholes = [_Work(tuple(f for w in works for f in w.files), sum(w.nbytes for w in works),
                    frozenset().union(*(w.items for w in works))) for works in grouped.values()]
    owner = min((_assign(wholes, read, processes), _assign(singles, read, processes)), key=lambda pair: pair[1])[0]
    entry_owner = tuple(owner[file] for file, _ in files)
    readers = _item_readers(plan, index_of, entry_owner)
    written = [0] * processes
    for file, (nbytes, _) in by_file.items():
        written[owner[file]] += nbytes
    return Split(processes, entry_owner, readers, owner, tuple(written),
                 tuple(sum(read[i] for i, who in enumerate(readers) if p in who) for p in range(processes)),
                 sum(read[i] * (len(who) - 1) for i, who in enumerate(readers)))


def _assign(works: list[_Work], read: Sequence[int], processes: int) -> tuple[dict[Hashable, int], int]:
    """Each work to a process, largest first, where the cost grows least; (file -> process, the largest cost)."""
    loads = [0] * processes
    seen: list[set[int]] = [set() for _ in range(processes)]
    owner: dict[Hashable, int] = {}
    for work in sorted(works, key=lambda w: -(w.nbytes + sum(read[i] for i in w.items))):
        costs = [loads[p] + work.nbytes + sum(read[i] for i in work.items - seen[p]) for p in range(processes)]
        chosen = min(range(processes), key=lambda p: (costs[p], p))
        loads[chosen] = costs[chosen]
        seen[chosen] |= work.items
        owner.update((file, chosen) for file in work.files)
    return owner, max(loads)


def _item_readers(plan: Plan, index_of: dict[int, int], entry_owner: Sequence[int]) -> tuple[frozenset[int], ...]:
    """The processes reading each item: those writing its outputs. An item writing nothing (a check that a
    tensor Megatron has no place for is zero) is read by the process reading the item before it."""
    readers: list[set[int]] = [set() for _ in plan.items]
    for (item, *_), owner in zip(plan.by_item, entry_owner):
        readers[index_of[id(item)]].add(owner)
    previous = 0
    for who in readers:
        if not who:
            who.add(previous)
        previous = min(who)
    return tuple(frozenset(who) for who in readers)

