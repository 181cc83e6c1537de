"""What the Python check scripts (tally_smoke.py, tally_contract.py) share.

Importing it puts the generated stubs (client/python/gen/, written by
scripts/gen-clients.sh) on the import path. `Checks` prints one line per
check and the "N passed, N failed" summary the cluster tests look for.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))


def addrs_from_args():
    """The --addr host:port[,host:port...] argument, split."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True, help="host:port[,host:port...]")
    args = parser.parse_args()
    return [a.strip() for a in args.addr.split(",") if a.strip()]


def channel(addr, options=None):
    """A channel to one node, as a cluster with TLS and tokens needs it.

    TALLY_CA (the cluster's CA, PEM) turns TLS on; TALLY_CERT and TALLY_KEY
    add a client certificate (tallyd --tls-client-ca); TALLY_TOKEN is sent
    as `authorization: Bearer ...` on every call (grpc sends call
    credentials over TLS only). Without TALLY_CA: plaintext.
    """
    import grpc

    ca = os.environ.get("TALLY_CA")
    if not ca:
        return grpc.insecure_channel(addr, options=options)
    read = lambda path: open(path, "rb").read()  # noqa: E731
    cert, key = os.environ.get("TALLY_CERT"), os.environ.get("TALLY_KEY")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    token = os.environ.get("TALLY_TOKEN")
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(addr, credentials, options=options)


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, condition, detail=""):
        if condition:
            self.passed += 1
            print(f"ok    {name}")
        else:
            self.failed += 1
            print(f"FAIL  {name} {detail}")

    def summary(self):
        """Print the summary; the process exit status."""
        print(f"{self.passed} passed, {self.failed} failed")
        return 0 if self.failed == 0 else 1
