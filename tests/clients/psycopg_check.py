"""psycopg 3 through the gateway: connects with the DSN in argv[1], runs one query, prints its
result and the session's TLS state as psycopg sees it. Exit 0 on success."""
import sys

import psycopg


def main() -> int:
    try:
        with psycopg.connect(sys.argv[1]) as conn:
            n = conn.execute("select count(*) from film").fetchone()[0]
            tls = conn.pgconn.ssl_in_use
            print(f"{n} {'tls' if tls else 'plain'}")
    except psycopg.Error as e:
        print(f"psycopg: {getattr(e, 'sqlstate', '')} {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
