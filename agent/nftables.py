"""nftables in the agent's own process, through libnftables (the library the ``nft`` tool is built on).

An ``nft -f`` process costs ~4 ms to start, and when its transaction
removes rules (opening admission flushes the admission chains) the kernel
holds the release of its netlink socket for an RCU grace period while the
old rules are destroyed: `strace` shows ``close()`` of that socket taking
10-20 ms on this machine, so opening admission took 10-20 ms where closing
it took ~5.  A library context keeps its socket open across transactions:
the same scripts then take ~0.1 ms, and the rules take effect at commit as
before (only the destruction of the old ones is left to the kernel).

The library opens its socket in the namespace of the calling process, so a
context is only ever made for a process that lives in the namespace it
manages (an agent after ``--netns``); everything else runs the ``nft`` tool
through :func:`natmig.netns.run`.
"""

from __future__ import annotations

import ctypes
import json
import threading
from typing import Any

from .. import netns
from ..errors import ProviderError

#: The shared library of Debian's libnftables1 (a dependency of the nftables package).
LIBRARY = "libnftables.so.1"
#: enum nft_output_flags: NFT_CTX_OUTPUT_JSON (what ``nft -j`` sets).
OUTPUT_JSON = 1 << 4


class NftablesError(ProviderError):
    """libnftables refused a script; the message is the library's own (what the nft tool prints)."""


class Nftables:
    """One libnftables context: run nft scripts, get their output.  Safe to share between threads."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBRARY)
        except OSError as e:
            raise NftablesError(f"cannot load {LIBRARY}: {e}") from e
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise NftablesError("nft_ctx_new failed")
        # Output and errors go to buffers read after each command, not to stdout/stderr.
        if lib.nft_ctx_buffer_output(ctx) != 0 or lib.nft_ctx_buffer_error(ctx) != 0:
            lib.nft_ctx_free(ctx)
            raise NftablesError("cannot buffer libnftables output")
        self._lib = lib
        self._ctx: int | None = ctx
        # One context is not reentrant; the agent's handler threads take turns.
        self._lock = threading.Lock()

    def run(self, script: str) -> str:
        """Run an nft script as one transaction (as ``nft -f``); its output, or :class:`NftablesError`."""
        with self._lock:
            if self._ctx is None:
                raise NftablesError("the libnftables context is closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftablesError(err.strip() or f"nft script failed ({rc})")
        return out

    def run_json(self, command: str) -> dict[str, Any]:
        """Run a command with JSON output (as ``nft -j``) and decode its output (libnftables' JSON schema)."""
        with self._lock:
            if self._ctx is None:
                raise NftablesError("the libnftables context is closed")
            flags = self._lib.nft_ctx_output_get_flags(self._ctx)
            self._lib.nft_ctx_output_set_flags(self._ctx, flags | OUTPUT_JSON)
            try:
                rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
            finally:
                self._lib.nft_ctx_output_set_flags(self._ctx, flags)
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftablesError(err.strip() or f"nft command failed ({rc})")
        return _decode(out)

    def close(self) -> None:
        """Free the context (idempotent)."""
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


_shared: dict[str, Nftables] = {}
_shared_lock = threading.Lock()


def in_process(name: str) -> Nftables | None:
    """The process's context for namespace ``name`` if this process lives in it, else None.

    None also when the library cannot be loaded: the caller then runs the
    ``nft`` tool, which needs the same library.
    """
    if not netns.inside(name):
        return None
    with _shared_lock:
        nft = _shared.get(name)
        if nft is None:
            try:
                nft = _shared[name] = Nftables()
            except NftablesError:
                return None
        return nft


def _decode(out: str) -> dict[str, Any]:
    try:
        return json.loads(out) if out.strip() else {"nftables": []}
    except ValueError as e:
        raise NftablesError(f"libnftables printed JSON that does not decode: {e}") from None


def run(name: str, script: str) -> str:
    """Run an nft script in namespace ``name``: in this process when it lives there, else with the ``nft`` tool."""
    lib = in_process(name)
    if lib is not None:
        return lib.run(script)
    try:
        return netns.run(["nft", "-f", "-"], name, input=script).stdout
    except netns.CommandError as e:
        raise NftablesError(e.stderr or str(e)) from e


def run_json(name: str, command: str) -> dict[str, Any]:
    """:meth:`Nftables.run_json` in namespace ``name``: in this process when it lives there, else ``nft -j``."""
    lib = in_process(name)
    if lib is not None:
        return lib.run_json(command)
    try:
        # One command on the command line: `nft -j -f -` prints nothing for a listing (nft 1.0.6).
        return _decode(netns.run(["nft", "-j", *command.split()], name).stdout)
    except netns.CommandError as e:
        raise NftablesError(e.stderr or str(e)) from e
