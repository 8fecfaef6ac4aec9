"""What keeps an embedded server its owner's: a private socket directory, claimed safely, and
the authentication files that admit only the owner.

The socket directory lives in the system's temporary directory (a socket path is limited to
~107 bytes, which a config directory's depth would exceed), where any local user may create
entries. So a directory is used only when it is ours: made by us now, or found owned by us (or
by the server's user) and not reached through a symbolic link. Its owner and mode are set
through a descriptor opened with O_NOFOLLOW, so a link planted at its name is never followed
and no one else's directory is ever chmod-ed. One that is ours but was open to others (an older
version's 0777) is closed first, then emptied of what others may have left in it. Anything
else at that name is left alone and a fresh directory with a random name (mkdtemp) is used.

Authentication is `peer` with the pg_ident map `shardctl`: the owner's OS user and the server's
own may connect, as any role. There is no password to keep, print or leak, and the servers'
subscriptions to each other (which connect as the server's OS user) need none either.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError

MAP = "shardctl"
HBA_MARKER = "# shardctl: only the owner reaches this server"
HBA = f"""{HBA_MARKER} (peer authentication, pg_ident map {MAP}).
# Written by shardctl when the file lacks the line above; lines added above or below are kept.
local   all           all   peer map={MAP}
local   replication   all   peer map={MAP}
"""
SOCKET_LIMIT = 107  # bytes of a Unix socket's path (sun_path is 108, with its NUL)
SOCKET_NAME = ".s.PGSQL.5432"
# pg_ctl hands the socket directory and the data directory to a shell (within double quotes)
_SHELL_SAFE = re.compile(r"[^\"`$\\\n]*")
_OS_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\$?")


@dataclass(frozen=True)
class Account:
    """The OS user a server runs as."""

    name: str
    uid: int
    gid: int


def ident(owner: str, server: Account) -> str:
    """pg_ident.conf: the OS users peer authentication lets in, as any role."""
    users = sorted({owner, server.name})
    for user in users:
        if not _OS_USER.fullmatch(user):
            raise UserError(f"the OS user name {user!r} cannot be written into pg_ident.conf",
                            "run shardctl as a user with a plain name (letters, digits, . _ -)")
    lines = [f"{MAP}   {user}   all" for user in users]
    return (f"# shardctl: the OS users that may connect (peer authentication, map {MAP}), as any role:\n"
            "# the owner, and the server's own user (the servers' subscriptions to each other)\n"
            + "\n".join(lines) + "\n")


def write_private(path: Path, text: str, account: Account | None) -> None:
    """Replace PATH with TEXT: a new file (never following a link planted at its name), mode 0600,
    owned by ACCOUNT (the server must read it) when we are root, renamed into place."""
    tmp = path.with_name(f".{path.name}.shardctl-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if account is not None and os.geteuid() == 0:
            os.fchown(fd, account.uid, account.gid)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def check_shell_safe(path: Path, what: str) -> None:
    """pg_ctl runs the server through a shell, with these paths in double quotes."""
    if not _SHELL_SAFE.fullmatch(str(path)):
        raise UserError(f"the {what} {str(path)!r} holds a character that pg_ctl's shell would interpret"
                        " (\" ` $ \\ or a newline)", "use a path without them")


def claim(preferred: Path, server: Account) -> tuple[Path, str | None]:
    """A private socket directory: PREFERRED when it is ours or can be made, else a fresh one
    next to it. Returns it and, when PREFERRED was passed over, why (to be said to the user)."""
    _check_parent(preferred.parent)
    problem = _take(preferred, server)
    path = preferred
    if problem is not None:
        path = Path(tempfile.mkdtemp(prefix="shardctl-", dir=preferred.parent))
        again = _take(path, server)
        if again is not None:  # made by us a moment ago in a directory others cannot rename in
            raise UserError(f"could not make a private socket directory: {again}")
    socket = path / SOCKET_NAME
    if len(str(socket).encode()) > SOCKET_LIMIT:
        raise UserError(f"the socket path {socket} is longer than {SOCKET_LIMIT} bytes",
                        "set TMPDIR to a shorter directory (for example /tmp) and start again")
    check_shell_safe(path, "socket directory")
    return path, problem


def _check_parent(parent: Path) -> None:
    """Others must not be able to rename our directory away and put theirs in its place: the
    parent is writable only by its owner (root or us), or has the sticky bit (as /tmp does)."""
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise UserError(f"the temporary directory {parent} cannot be used: {exc.strerror}",
                        "set TMPDIR to an existing directory") from None
    open_to_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
    if open_to_others or st.st_uid not in (0, os.geteuid()):
        raise UserError(f"the temporary directory {parent} is writable by other users without the sticky bit"
                        " (or owned by another user): a socket directory there could be replaced",
                        "set TMPDIR to a directory only you (or root) can write to, such as /tmp")


def _take(path: Path, server: Account) -> str | None:
    """Make PATH ours and private, or say why it cannot be (then it is left as it was)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:  # a symbolic link (ELOOP), a file (ENOTDIR)...
        return f"{path} is not a directory of ours ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if st.st_uid not in (os.geteuid(), server.uid):
            return (f"{path} was made by another user (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
                    " and is left alone")
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (server.uid, server.gid):
            os.fchown(fd, server.uid, server.gid)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
            # it was open to others (an older version's 0777): what they may have left goes
            for entry in os.listdir(fd):
                try:
                    os.unlink(entry, dir_fd=fd)
                except OSError as exc:
                    return f"{path} held {entry!r}, which could not be removed ({exc.strerror})"
        return None
    finally:
        os.close(fd)
