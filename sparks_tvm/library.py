"""An exported library's sidecar (``<lib>.sparks.json``) and the inputs files given to it.

The sidecar records the model's inputs, outputs, target and report, plus the size and sha256
of the library itself: ``tvm.runtime.load_module`` of a truncated or overwritten shared
library crashes the process (SIGBUS/SIGSEGV in the dynamic loader) instead of raising, so
:func:`check_library` compares both before anything is loaded. Everything read from a file
is validated here, so a damaged file is a :class:`LibraryError` or :class:`InputFileError`
naming it, never a ``KeyError`` or ``JSONDecodeError`` from deep inside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from .errors import InputFileError, LibraryError

logger = logging.getLogger("sparks_tvm")

SIDECAR_SUFFIX = ".sparks.json"


def file_digest(path: str) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file (read in 1 MiB blocks)."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
    return {"size": size, "sha256": sha.hexdigest()}


def write_sidecar(library_path: str, meta: dict) -> str:
    """Write ``<library_path>.sparks.json`` with the library's digest; returns its path.

    Written to a temporary file and renamed, so an interrupted export never leaves half a
    sidecar next to a whole library.
    """
    side = library_path + SIDECAR_SUFFIX
    tmp = side + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(dict(meta, library=file_digest(library_path)), fh, indent=1)
    os.replace(tmp, side)
    return side


def read_sidecar(library_path: str) -> dict:
    """The validated sidecar of ``library_path``.

    Raises
    ------
    LibraryError
        The sidecar is missing, empty, not JSON, or lacks (or mistypes) a field.
    """
    side = library_path + SIDECAR_SUFFIX
    if not os.path.isfile(side):
        raise LibraryError(f"{side} is missing: it records the inputs of {library_path}; export with sparks_tvm")
    try:
        with open(side, "rb") as fh:
            data = fh.read()
        meta = json.loads(data.decode("utf-8"))
    except OSError as err:
        raise LibraryError(f"{side}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        what = "empty" if not data.strip() else f"not valid JSON ({str(err)[:120]})"
        raise LibraryError(f"{side} is {what}: the sidecar is corrupt; export {library_path} again") from None
    problem = _sidecar_problem(meta)
    if problem:
        raise LibraryError(f"{side}: {problem}; the sidecar is corrupt or not written by sparks_tvm: "
                           f"export {library_path} again")
    return meta


def _sidecar_problem(meta) -> str | None:
    """What is wrong with a parsed sidecar, in words (None: nothing)."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, found {type(meta).__name__}"
    inputs, outputs = meta.get("inputs"), meta.get("outputs")
    if not isinstance(inputs, list) or not inputs:
        return "'inputs' is missing or not a non-empty list"
    for i, spec in enumerate(inputs):
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("dtype"), str)
                and isinstance(spec.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in spec["shape"])):
            return f"input #{i} is not {{name: str, shape: [positive ints], dtype: str}}"
        try:
            np.dtype(spec["dtype"])
        except TypeError:
            return f"input #{i} has unknown dtype {spec['dtype'][:40]!r}"
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        return "'outputs' is missing or not a list of names"
    if not isinstance(meta.get("report", []), list) or not isinstance(meta.get("target", ""), str):
        return "'report' is not a list or 'target' is not a string"
    lib = meta.get("library")
    if lib is not None and not (isinstance(lib, dict) and isinstance(lib.get("size"), int)
                                and isinstance(lib.get("sha256"), str)):
        return "'library' is not {size: int, sha256: str}"
    return None


def check_library(library_path: str, meta: dict) -> None:
    """Refuse a library whose size or sha256 differs from what its sidecar recorded.

    A sidecar from before the digest was recorded is accepted with a warning.
    """
    if not os.path.isfile(library_path):
        kind = "a directory, not a library" if os.path.isdir(library_path) else "no such file"
        raise LibraryError(f"{library_path}: {kind}")
    want = meta.get("library")
    if want is None:
        logger.warning("%s%s records no size/sha256 (exported by an older sparks_tvm): loading unchecked",
                       library_path, SIDECAR_SUFFIX)
        return
    size = os.path.getsize(library_path)
    if size != want["size"]:
        raise LibraryError(f"{library_path} is {size} bytes, but {want['size']} were exported: the library is "
                           f"truncated or was overwritten; export it again")
    if file_digest(library_path)["sha256"] != want["sha256"]:
        raise LibraryError(f"{library_path}: sha256 differs from the one recorded at export: the library is "
                           f"corrupt or was replaced; export it again")


def read_inputs(path: str, names: list) -> list:
    """The arrays named ``names`` from an ``.npz`` file, in that order.

    Raises
    ------
    InputFileError
        Not a file, not an ``.npz`` (an ``.npy`` holds one unnamed array), unreadable, or
        without one of ``names``.
    """
    if not os.path.isfile(path):
        raise InputFileError(f"{path}: {'a directory' if os.path.isdir(path) else 'no such file'}, "
                             "expected an .npz with one array per model input")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises ValueError, OSError, EOFError, zip errors...
        raise InputFileError(f"{path}: cannot read inputs ({err.__class__.__name__}: {str(err)[:160]}); "
                             "expected an .npz (np.savez(path, input_name=array))") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        hint = f"np.savez({os.path.basename(path)[:-4] or 'x'}.npz, {names[0]}=array)" if names else "np.savez"
        raise InputFileError(f"{path}: an .npy holds one unnamed array; the model's inputs are {names}: "
                             f"save them by name with {hint}")
    with data:
        missing = [n for n in names if n not in data.files]
        if missing:
            raise InputFileError(f"{path} lacks input(s) {missing} of the model; it has {sorted(data.files)[:10]}")
        try:
            return [data[n] for n in names]
        except Exception as err:  # noqa: BLE001 - a damaged member: zlib, zipfile, ValueError, MemoryError...
            raise InputFileError(f"{path}: cannot read an input array ({err.__class__.__name__}: "
                                 f"{str(err)[:160]}); the file is corrupt") from None
