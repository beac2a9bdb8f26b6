"""Statistics of LoRA deltas in factored form: inner products, norms and cosines, exactly,
without ever forming a dense d_out x d_in matrix.

An adapter's delta in a module is B A (the task's scale lora_alpha / r is common to every
upload of a round, so it is left out: ratios and cosines do not depend on it), and what a
shard did in a round is its change from the start adapter, B_s A_s - B_0 A_0. The Frobenius
inner product of two products needs only r x r matrices:

    <B1 A1, B2 A2>_F = tr(A1^T B1^T B2 A2) = sum((B1^T B2) * (A1 A2^T))

(elementwise product, O((d_out + d_in) r^2)), summed over modules in float64. `product_gram`
computes it for every pair of adapters at once; a change is bilinear in the products, so the
Gram of the changes follows from it: <c_i, c_j> = G_ij - G_i0 - G_0j + G_00, with 0 the start.
This is the same sum the stacked factors [B_s, -B_0] [A_s; A_0] give, term for term.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cotune.orchestrator.verify.expected import AdapterFactors
from cotune.orchestrator.verify.issues import VerifyError


def product_gram(adapters: Sequence[AdapterFactors | None]) -> np.ndarray:
    """G[i, j] = sum over modules of <B_i A_i, B_j A_j>_F, float64; None is a zero adapter
    (a fresh PEFT init, whose B is zero). All others must share modules and shapes."""
    present = [i for i, adapter in enumerate(adapters) if adapter is not None]
    gram = np.zeros((len(adapters), len(adapters)))
    if not present:
        return gram
    layouts = [adapter for adapter in adapters if adapter is not None]
    for module in _common_modules(layouts, present):
        pairs = [adapter[module] for adapter in layouts]
        ranks = [pair.a.shape[0] for pair in pairs]
        b_all = np.concatenate([pair.b for pair in pairs], axis=1).astype(np.float64)
        a_all = np.concatenate([pair.a for pair in pairs], axis=0).astype(np.float64)
        blocks = (b_all.T @ b_all) * (a_all @ a_all.T)
        starts = np.cumsum([0, *ranks[:-1]])
        summed = np.add.reduceat(np.add.reduceat(blocks, starts, axis=0), starts, axis=1)
        gram[np.ix_(present, present)] += summed
    return gram


def _common_modules(adapters: Sequence[AdapterFactors], labels: Sequence[int]) -> list[str]:
    """The modules every adapter has, each of one delta shape (else VerifyError)."""
    first, label0 = adapters[0], labels[0]
    modules = sorted(first)
    for label, adapter in zip(labels, adapters, strict=True):
        if sorted(adapter) != modules:
            raise VerifyError(f"adapter {label} has other modules than adapter {label0}")
        for module in modules:
            mine, theirs = first[module], adapter[module]
            rank = theirs.a.shape[0]
            if rank == 0 or theirs.b.shape[1] != rank:
                raise VerifyError(
                    f"adapter {label}: module {module}: A {theirs.a.shape} and B "
                    f"{theirs.b.shape} are not a LoRA pair of rank >= 1"
                )
            if (mine.b.shape[0], mine.a.shape[1]) != (theirs.b.shape[0], theirs.a.shape[1]):
                raise VerifyError(
                    f"adapter {label}: module {module} is {theirs.b.shape[0]} x "
                    f"{theirs.a.shape[1]}, adapter {label0}'s is {mine.b.shape[0]} x "
                    f"{mine.a.shape[1]}"
                )
    return modules


def change_gram(uploads: Sequence[AdapterFactors], start: AdapterFactors | None) -> np.ndarray:
    """C[i, j] = <c_i, c_j>, c_k = upload k's product minus the start's (None: zero)."""
    gram = product_gram([start, *uploads])
    return gram[1:, 1:] - gram[1:, :1] - gram[:1, 1:] + gram[0, 0]


def norms(gram: np.ndarray) -> np.ndarray:
    """The norms a Gram matrix implies (round-off negatives are 0)."""
    return np.sqrt(np.clip(np.diag(gram), 0.0, None))


def cosines(gram: np.ndarray) -> np.ndarray:
    """The cosines a Gram matrix implies; 0 against a zero vector (it has no direction)."""
    n = norms(gram)
    outer = np.outer(n, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(outer > 0, gram / np.where(outer > 0, outer, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def distances(gram: np.ndarray) -> np.ndarray:
    """||x_i - x_j|| for every pair, from the Gram matrix."""
    diag = np.diag(gram)
    return np.sqrt(np.clip(diag[:, None] + diag[None, :] - 2 * gram, 0.0, None))


def change_norm(upload: AdapterFactors, start: AdapterFactors | None) -> float:
    """||B_s A_s - B_0 A_0||_F over all modules: how far the upload moved from its start."""
    return float(norms(change_gram([upload], start))[0])


def change_cosine(
    first: AdapterFactors, second: AdapterFactors, start: AdapterFactors | None
) -> float:
    """The cosine between two uploads' changes from a common start (0 if either is zero)."""
    return float(cosines(change_gram([first, second], start))[0, 1])
