"""API keys: from the configuration (`api_key`, i.e. `PGW_API_KEY`) and a key file (one key per line; blank
lines and `#` comments ignored), re-read on SIGHUP. Clients send `authorization: Bearer <key>`; every key is
compared in constant time, so the time a check takes says nothing about any key.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from gateway.errors import InvalidInput

log = logging.getLogger(__name__)
SCHEME = "Bearer "


def read_key_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"api_key_file {path}: cannot read it ({exc.strerror})") from exc
    keys = [line.strip() for line in text.splitlines()]
    return [key for key in keys if key and not key.startswith("#")]


class ApiKeys:
    """The keys a server accepts. Empty (no key configured): every request passes."""

    def __init__(self, key: str | None = None, file: Path | None = None) -> None:
        self.file = file
        self._fixed = [key] if key else []
        self._keys = [k.encode() for k in self._fixed + (read_key_file(file) if file else [])]
        if file is not None and not self._keys:
            raise InvalidInput(f"api_key_file {file} holds no key: one key per line")

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def reload(self) -> None:
        """Re-read the key file (SIGHUP); on a failure keep the keys in use and log why."""
        if self.file is None:
            return
        try:
            keys = self._fixed + read_key_file(self.file)
        except InvalidInput as exc:
            log.error("API keys not reloaded, the old ones stay in use: %s", exc)
            return
        if not keys:
            log.error("API keys not reloaded: %s holds no key; the old ones stay in use", self.file)
            return
        self._keys = [k.encode() for k in keys]
        log.info("API keys reloaded from %s: %d keys", self.file, len(self._keys))

    def allows(self, authorization: str | bytes | None) -> bool:
        """Whether an `authorization` header value carries one of the keys."""
        if not self._keys:
            return True
        if isinstance(authorization, bytes):
            authorization = authorization.decode("utf-8", "replace")
        if not authorization or not authorization.startswith(SCHEME):
            return False
        offered = authorization[len(SCHEME) :].strip().encode()
        found = False
        for key in self._keys:  # no early exit: every key is compared
            found |= hmac.compare_digest(offered, key)
        return found
