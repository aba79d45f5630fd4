"""Search time of ``autossvh.search.HammingIndex``, flat (exact) against multihash (approximate).

For each database size: 64-bit packed codes, 1,000 queries, top-10 (and top-100). Two kinds of data:

* ``random``: uniform random codes and queries. The worst case for hashing: a query's 10 nearest codes are
  at distance 13-17 in 1M codes, beyond multihash's guaranteed radius (8 bits over 1M 64-bit codes), so its
  recall is low.
* ``clustered``: codes around 1,000 random class prototypes, each bit flipped with probability ``--flip``,
  and queries drawn the same way. Learned codes look more like this: near neighbours and many ties at the
  same distance, so flat's exact tie handling gets exercised.

Prints, per case: the index (``mh NxB``: N hash tables of B-bit substrings), build seconds, search seconds,
queries per second and, for multihash, recall@k against the exact flat result: the fraction of the k slots
holding an item no farther than the exact k-th distance. The faiss thread count is printed too. Timings move
with machine load: faiss's OpenMP threads slow down many times when other processes share the cores
(``--threads 1`` is steadier on a busy machine).

Usage: ``python benchmarks/bench_search.py [--sizes 100000 1000000] [--queries 1000] [--bits 64] [--threads N]``.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from autossvh.search import HammingIndex, IndexKind, multihash_params


def make_codes(kind: str, n: int, queries: int, bits: int, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed database (n, bits / 8) and query (queries, bits / 8) codes of the given kind."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (rng.integers(0, 256, (n, bits // 8), dtype=np.uint8),
                rng.integers(0, 256, (queries, bits // 8), dtype=np.uint8))
    prototypes = rng.random((1000, bits)) < 0.5

    def draw(count: int) -> np.ndarray:
        bits_set = prototypes[rng.integers(0, len(prototypes), count)] ^ (rng.random((count, bits)) < flip)
        return np.packbits(bits_set, axis=1)

    return draw(n), draw(queries)


def timed_search(database: np.ndarray, queries: np.ndarray, kind: IndexKind, k: int) -> tuple[float, float, np.ndarray]:
    """Build seconds, search seconds and the (Q, k) distances."""
    began = time.perf_counter()
    index = HammingIndex(database, kind)
    built = time.perf_counter()
    distances, _ = index.search(queries, k)
    return built - began, time.perf_counter() - built, distances


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the k slots filled with an item no farther than the exact k-th distance (from (Q, k)
    distances; ties count whichever tied item was returned)."""
    return float(np.mean(found <= exact[:, -1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--flip", type=float, default=0.1, help="bit flip probability of the clustered data")
    parser.add_argument("--data", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    parser.add_argument("--threads", type=int, help="faiss OpenMP threads (default: faiss's, one per core)")
    args = parser.parse_args()
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; {args.queries} queries, "
          f"{args.bits} bits")
    print(f"{'data':<10} {'N':>9} {'k':>4} {'index':<10} {'build s':>8} {'search s':>9} {'queries/s':>10} "
          f"{'recall':>7}")
    for data in args.data:
        for n in args.sizes:
            database, queries = make_codes(data, n, args.queries, args.bits, args.flip, seed=n)
            for k in args.ks:
                build, seconds, exact = timed_search(database, queries, "flat", k)
                print(f"{data:<10} {n:>9,} {k:>4} {'flat':<10} {build:>8.3f} {seconds:>9.3f} "
                      f"{args.queries / seconds:>10,.0f} {'1':>7}")
                build, seconds, found = timed_search(database, queries, "multihash", k)
                nhash, bits = multihash_params(args.bits, n)
                print(f"{data:<10} {n:>9,} {k:>4} {f'mh {nhash}x{bits}':<10} {build:>8.3f} {seconds:>9.3f} "
                      f"{args.queries / seconds:>10,.0f} {recall(found, exact):>7.3f}")


if __name__ == "__main__":
    main()
