"""Draft trees: nodes with parent indices, their ancestor masks, depths, paths and static shapes.

A draft tree of N nodes is `parents` [N]: parents[i] is the index of node i's parent, -1 for a child of
the root (the pending token, not a node). Parents come before their children (parents[i] < i), so every
root path is ascending, which is what `KVCache.keep` needs to commit it. A chain is the tree with
parents [-1, 0, 1, ...].

In a verification forward the root is column 0 and node i is column i + 1; each column sees the
committed context, the root and its own ancestors (itself included), and sits at rope position
committed length + depth (root depth 0, children of the root depth 1).

A static shape is a list of branching factors per depth: "2,2,1,1" means 2 children at depth 1, each
with 2 children at depth 2, then one child each below: 2 + 4 + 4 + 4 = 14 nodes, depth 4.
"""
from __future__ import annotations

import torch

MAX_TREE_NODES = 64


def chain_parents(n: int) -> list[int]:
    """Parents of a chain of n nodes.

    >>> chain_parents(3)
    [-1, 0, 1]
    """
    return list(range(-1, n - 1))






def depths(parents: list[int]) -> list[int]:
    """Depth of every node (children of the root: 1).

    >>> depths([-1, -1, 0, 0, 2])
    [1, 1, 2, 2, 3]
    """
    d: list[int] = []
    for p in parents:
        d.append(1 if p < 0 else d[p] + 1)
    return d


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[N, N] bool: mask[i, j] is True when node j is node i or one of its ancestors."""
    n = len(parents)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        m[i, i] = True
        if p >= 0:
            m[i] |= m[p]
    return m


def children(parents: list[int], node: int) -> list[int]:
    """The children of `node` (-1: the root), in index order."""
    return [i for i, p in enumerate(parents) if p == node]


def path_to(parents: list[int], node: int) -> list[int]:
    """Node indices from the root's child down to `node` (ascending); [] for the root (-1).

    >>> path_to([-1, -1, 0, 0, 2], 4)
    [0, 2, 4]
    """
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def shape_nodes(shape: list[int]) -> int:
    """Nodes of a static tree shape: sum over depths of the product of the branching factors so far.

    >>> shape_nodes([2, 2, 1, 1])
    14
    """
    total, level = 0, 1
    for b in shape:
        level *= b
        total += level
    return total


def shape_parents(shape: list[int]) -> list[int]:
    """The parents of the full static tree of `shape`, breadth first (every node's children are
    consecutive, children of earlier nodes first).

    >>> shape_parents([2, 2])
    [-1, -1, 0, 0, 1, 1]
    """
    parents: list[int] = []
    frontier = [-1]
    for b in shape:
        nxt = []
        for node in frontier:
            for _ in range(b):
                parents.append(node)
                nxt.append(len(parents) - 1)
        frontier = nxt
    return parents


def parse_shape(value, flag: str = "--tree") -> list[int]:
    """A static tree shape from "2,2,1,1" or [2, 2, 1, 1]: positive branching factors, at most
    MAX_TREE_NODES nodes in all. Raises ValueError naming `flag`."""
    items = value
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",")]
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{flag} {value!r}: give branching factors per depth, e.g. 2,2,1,1")
    shape = []
    for s in items:
        if isinstance(s, int) and not isinstance(s, bool):
            b = s
        else:
            b = int(s) if isinstance(s, str) and s.isascii() and s.isdigit() else None
        if b is None or b < 1:
            raise ValueError(f"{flag} {value!r}: every branching factor must be a positive integer, got {s!r} "
                             "(e.g. 2,2,1,1)")
        shape.append(b)
    n = shape_nodes(shape)
    if n > MAX_TREE_NODES:
        raise ValueError(f"{flag} {value!r} has {n} nodes; at most {MAX_TREE_NODES} are allowed")
    return shape


def pack(parents_per_row: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The verification layout of one draft tree per row, padded to `width` columns (root + nodes).

    Returns vis [R, width, width] bool (column j sees column i when i is j's ancestor or j itself; every
    column sees the root at 0) and depth [R, width] long (root 0, nodes their depth, padding -1).
    Padding columns see only the root and themselves.
    """
    R = len(parents_per_row)
    vis = torch.zeros(R, width, width, dtype=torch.bool)
    depth = torch.full((R, width), -1, dtype=torch.long)
    eye = torch.eye(width, dtype=torch.bool)
    vis[:] = eye
    vis[:, :, 0] = True
    depth[:, 0] = 0
    for r, parents in enumerate(parents_per_row):
        n = len(parents)
        if n:
            vis[r, 1:1 + n, 1:1 + n] = ancestor_mask(parents)
            depth[r, 1:1 + n] = torch.tensor(depths(parents))
    return vis, depth
