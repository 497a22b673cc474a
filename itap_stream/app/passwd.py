"""Mosquitto password files: add or replace users, hashed the way mosquitto 2 hashes them.

A line is ``user:$7$<iterations>$<base64 salt>$<base64 hash>``: ``$7$`` is
PBKDF2-HMAC-SHA512 with 101 iterations, a 12-byte random salt and a 64-byte key, as
``mosquitto_passwd`` 2.x writes it (checked against its output and a running mosquitto
in ``tests/network/test_security.py``). The file holds secrets: it is created with mode
0600 and never committed (``mosquitto/passwd`` is in ``.gitignore``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from itap_stream.errors import ConfigError

__all__ = ["hash_password", "new_password", "update_password_file", "verify_password"]

#: mosquitto 2.x defaults (``mosquitto_passwd`` without ``-I``).
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
KEY_BYTES = 64

#: Characters a username must not hold: ``:`` ends the name in the file, and ``+``, ``#``
#: and ``/`` would change the topic that the ACL pattern ``itap/telemetry/%u`` names.
_FORBIDDEN_IN_USER = frozenset(":+#/")


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The mosquitto 2 hash of ``password`` (a random salt unless one is given).

    Parameters
    ----------
    password
        The clear-text password.
    salt
        Salt bytes; 12 random bytes by default. Pass one only to reproduce a hash.
    iterations
        PBKDF2 iterations (mosquitto's default 101).

    Returns
    -------
    ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``, the part after ``user:``.

    Examples
    --------
    >>> hash_password("secret", salt=bytes(12))[:24]
    '$7$101$AAAAAAAAAAAAAAAA$'
    >>> verify_password("secret", hash_password("secret")), verify_password("guess", hash_password("secret"))
    (True, False)
    """
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, KEY_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (False for any other or a malformed one).

    Examples
    --------
    >>> verify_password("x", "$6$not-a-pbkdf2-hash")
    False
    """
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, key = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]), len(key))
    return hmac.compare_digest(candidate, key)


def new_password() -> str:
    """A random password: 24 URL-safe characters (144 bits), safe in URLs and ``.env`` files.

    Examples
    --------
    >>> p = new_password()
    >>> len(p), p != new_password()
    (24, True)
    """
    return secrets.token_urlsafe(18)


def _check_user(user: str) -> None:
    bad = sorted(_FORBIDDEN_IN_USER & set(user))
    if not user or bad or not user.isprintable() or user != user.strip():
        shown = f" ({' '.join(bad)} not allowed)" if bad else ""
        msg = (
            f"username {user!r} cannot be used{shown}: it must be non-empty, printable, without spaces at either "
            "end and without ':' (ends the name in the file), '/', '+' or '#' (they would change the device topic "
            "itap/telemetry/<username> of the ACL)"
        )
        raise ConfigError(msg)


def update_password_file(path: str | Path, passwords: Mapping[str, str]) -> None:
    """Add the users of ``passwords`` to the mosquitto password file ``path``, replacing
    their old lines; every other line is kept as it was.

    A new file is created with mode 0600. An existing one is rewritten in place, as
    ``mosquitto_passwd`` does: it keeps its owner, group and mode (say, readable by the
    broker's user only), and its inode, so a broker that has the single file bind-mounted
    (docker compose) sees the change on its next reload (SIGHUP).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "passwd"
    >>> update_password_file(f, {"DEV-0001": "a", "itap-consumer": "b"})
    >>> update_password_file(f, {"DEV-0001": "c"})
    >>> [line.split(":")[0] for line in f.read_text().splitlines()], oct(f.stat().st_mode & 0o777)
    (['itap-consumer', 'DEV-0001'], '0o600')
    """
    path = Path(path)
    for user, password in passwords.items():
        _check_user(user)
        if not password or "\n" in password or "\r" in password:
            msg = f"the password of {user!r} must be a non-empty single line"
            raise ConfigError(msg)
    try:
        old = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, so not a mosquitto password file
        msg = f"cannot read password file {path}: {getattr(exc, 'strerror', None) or exc}"
        raise ConfigError(msg) from exc
    kept = [line for line in old if line.split(":", 1)[0] not in passwords]
    lines = kept + [f"{user}:{hash_password(password)}" for user, password in passwords.items()]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)  # the mode applies only when it is created
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, len(data))  # cut what is left of a longer old text
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        msg = f"cannot write password file {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from exc
