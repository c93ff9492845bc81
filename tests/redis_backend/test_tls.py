"""Redis over TLS (`rediss://`), with an ACL user: works with the CA given, and a
certificate that cannot be verified is reported at once, not retried."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from ivip_ipc_async import AsyncIPC
from ivip_ipc_async.errors import BackendUnavailableError

from ..redis_server import TlsServer, tls_files
from .support import needs_redis_server


@needs_redis_server
async def test_tls_with_an_acl_user_and_a_certificate_that_fails(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    if not files:
        pytest.skip("no openssl to make a certificate")
    server = TlsServer(files)
    server.start()
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    try:
        admin = server.admin()
        admin.execute_command(
            "ACL", "SETUSER", "app", "on", ">pw", f"~ivip:{{{namespace}}}:*", "resetchannels",
            f"&ivip:{{{namespace}}}:live", f"&ivip:{{{namespace}}}:lk:*", "+@all",
        )  # fmt: skip
        admin.close()
        url = server.tls_url.replace("rediss://", "rediss://app:pw@")
        async with (
            AsyncIPC(url, namespace=namespace, ssl_ca_certs=str(files["ca.crt"])) as one,
            AsyncIPC(url, namespace=namespace, ssl_ca_certs=str(files["ca.crt"])) as two,
        ):
            heard = asyncio.Event()
            two.on("m", lambda _: heard.set())
            await one.notify("m", 1)
            async with one.lock("x") as lock:
                assert lock.held
            await asyncio.wait_for(heard.wait(), 10)
        # Without the CA, the server's certificate cannot be verified: no wait
        # would change that, so it is not retried for `retry_timeout`.
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BackendUnavailableError, match=r"(?i)certificate verify failed"):
            await AsyncIPC(url, namespace=namespace, retry_timeout=10).start()
        assert loop.time() - started < 3
    finally:
        server.close()
