"""Arrays of rows that arrive in batches (latents, caption contexts), stacked in memory or written to ``.npy``
files and read back memory-mapped: the cache of encoded private examples. Files are written under temporary names
and renamed when complete, so a crash never leaves a partial cache."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch


def _stack_rows(batches: Iterator[dict[str, np.ndarray]], n: int, path_of: Callable[[str], Path] | None):
    """Stack ``n`` rows of each named array arriving in batches (in the batches' dtype): in memory, or ``.npy`` files
    at ``path_of(name)``, read back memory-mapped. Files are written by appending each batch to the file (not through
    a writable memory map, whose dirty pages would stay resident: the whole array in RAM), under a temporary name
    renamed when complete (a crash never leaves a partial cache)."""
    out, files, tmp, start = {}, {}, {}, 0
    try:
        for rows in batches:
            for name, values in rows.items():
                if name not in out and name not in files:
                    shape = (n, *values.shape[1:])
                    if path_of is None:
                        out[name] = np.empty(shape, dtype=values.dtype)
                    else:
                        path = path_of(name)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp[name] = path.with_suffix(f".{os.getpid()}.tmp.npy")  # one per process: ranks may encode
                        files[name] = open(tmp[name], "wb")  # noqa: SIM115 (closed below, also on error)
                        header = {"descr": np.lib.format.dtype_to_descr(values.dtype), "fortran_order": False,
                                  "shape": shape}  # fmt: skip
                        np.lib.format.write_array_header_2_0(files[name], header)
                if path_of is None:
                    out[name][start : start + len(values)] = values
                else:
                    files[name].write(np.ascontiguousarray(values).tobytes())
            start += len(next(iter(rows.values())))
    except BaseException:
        for path in tmp.values():  # an interrupted encoding leaves no partial file behind
            path.unlink(missing_ok=True)
        raise
    finally:
        for file in files.values():
            file.close()
    if start != n:
        raise ValueError(f"expected {n} rows, got {start}")
    if path_of is None:
        return {name: torch.from_numpy(values) for name, values in out.items()}
    for name in tmp:
        os.replace(tmp[name], path_of(name))
    return {name: torch.from_numpy(np.load(path_of(name), mmap_mode="c")) for name in tmp}


def rows_to_array(batches: Iterator[np.ndarray], n: int, path: Path | None) -> torch.Tensor:
    """One array of ``n`` rows arriving in batches, in memory or memory-mapped at ``path`` (:func:`_stack_rows`)."""
    return _stack_rows(({"rows": rows} for rows in batches), n, None if path is None else lambda _: path)["rows"]


def rows_to_arrays(batches: Iterator[dict[str, np.ndarray]], n: int, prefix: Path | None) -> dict[str, torch.Tensor]:
    """Named arrays of ``n`` rows arriving in batches (:func:`_stack_rows`), with ``prefix`` cached as
    ``<prefix>-<name>.npy`` files plus ``<prefix>.json`` listing the names, written last: a complete cache is read
    back (memory-mapped) without consuming ``batches``."""
    if prefix is None:
        return _stack_rows(batches, n, None)
    index = Path(f"{prefix}.json")
    path_of = lambda name: Path(f"{prefix}-{name}.npy")  # noqa: E731
    if index.is_file():
        names = json.loads(index.read_text())
        if all(path_of(name).is_file() for name in names):
            return {name: torch.from_numpy(np.load(path_of(name), mmap_mode="c")) for name in names}
    arrays = _stack_rows(batches, n, path_of)
    tmp = index.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(list(arrays)))
    os.replace(tmp, index)
    return arrays

